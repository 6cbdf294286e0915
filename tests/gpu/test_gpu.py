"""On a machine with CUDA: the engine and a Serve replica on the GPU, in bfloat16.
Skipped elsewhere (CI has no GPU); bench/gpu_check.sh runs these on a GPU machine."""

import asyncio

import httpx
import pytest
import torch

from deployments.config import ModelConfig
from deployments.protocol import GenerationParams
from deployments.transformers_engine import TransformersEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def generate(engine, *params):
    async def one(prepared):
        last = None
        async for deltas in engine.generate(prepared):
            last = deltas[-1]
        return last

    async def all_of():
        return await asyncio.gather(*(one(engine.prepare(p)) for p in params))

    return asyncio.run(all_of())


def test_engine_generates_on_the_gpu_in_bfloat16_with_cuda_graphs(tiny_model_dir):
    engine = TransformersEngine(ModelConfig(name="tiny", source=str(tiny_model_dir)), "cuda")
    engine.load()
    status = engine.status()
    assert (status.device, status.dtype) == ("cuda", "bfloat16")
    assert next(engine._model.parameters()).device.type == "cuda"
    results = generate(
        engine,
        GenerationParams(prompt="Hello", max_new_tokens=16, temperature=0),
        GenerationParams(prompt="Sampled", max_new_tokens=12, temperature=0.8, seed=1),
    )
    assert [(r.completion_tokens, r.finish_reason) for r in results] == [(16, "length"), (12, "length")]
    decoder = engine._decoding.decoder
    assert decoder.uses_graphs and decoder.graphs_captured >= 1
    engine.close()


def test_cuda_graphs_give_the_eager_and_the_dynamic_paths_tokens(tiny_model_dir):
    """float32, so that the three paths' different kernels (padded graph buckets, eager
    shapes, left-padded dynamic cache) cannot flip a greedy choice by rounding."""
    from tests.unit.test_grammars import SCHEMAS, json_schema
    from tests.unit.test_slot_decoder import WORKLOAD, generate_all

    # Greedy rows whose choices go through the in-graph masks and penalties.
    steered = [
        *(GenerationParams(prompt=f"JSON {name}", max_new_tokens=60, temperature=0, constraint=json_schema(name))
          for name in SCHEMAS),
        GenerationParams(prompt="Penalised", max_new_tokens=24, temperature=0, presence_penalty=-2.0,
                         frequency_penalty=0.9),
    ]
    sampled = [
        GenerationParams(prompt="Sampled", max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=seed)
        for seed in range(3)
    ]
    results = {}
    for name, options in {
        "graphs": {"kv_cache": "slots"},
        "eager": {"kv_cache": "slots", "cuda_graphs": False},
        "dynamic": {"kv_cache": "dynamic"},
    }.items():
        engine = TransformersEngine(
            ModelConfig(name="tiny", source=str(tiny_model_dir), dtype="float32", max_batch_size=4, **options),
            "cuda",
        )
        engine.load()
        results[name] = generate_all(engine, WORKLOAD)
        results[name + " steered"] = generate_all(engine, steered)
        if name != "dynamic":  # the dynamic path has its own sampler
            results[name + " sampled"] = generate_all(engine, sampled)
        if name == "graphs":
            assert engine._decoding.decoder.uses_graphs, "capture failed: see the log"
        engine.close()
    assert results["graphs"] == results["eager"] == results["dynamic"]
    assert results["graphs steered"] == results["eager steered"] == results["dynamic steered"]
    assert results["graphs sampled"] == results["eager sampled"]


def test_a_serve_replica_lands_on_the_gpu(tiny_model_dir):
    ray = pytest.importorskip("ray", reason="Ray is not installed on this GPU machine")
    from ray import serve

    from serve_app.app import build_app, cluster_gpu_count, resolve_accelerator
    from serve_app.args import AppArgs, ModelArgs, RateLimitArgs
    from tests.integration.conftest import free_port

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert resolve_accelerator("auto", cluster_gpu_count()) == "gpu"
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = AppArgs(
            models=[ModelArgs(name="tiny", source=str(tiny_model_dir), num_replicas=1, autoscaling=None)],
            rate_limits=RateLimitArgs(enabled=False),
        )
        serve.run(build_app(args), name="gpu", route_prefix="/")
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30).json()
        assert ready["models"]["tiny"]["device"] == "cuda"
        assert ready["models"]["tiny"]["dtype"] == "bfloat16"
        body = httpx.post(
            f"http://127.0.0.1:{port}/generate", json={"prompt": "Hi", "max_new_tokens": 8}, timeout=60
        ).json()
        assert body["usage"]["completion_tokens"] == 8
    finally:
        serve.shutdown()
        ray.shutdown()
