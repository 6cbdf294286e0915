"""Engine throughput on a GPU against what the same model reaches elsewhere, in one run:

- ours: the engine alone (no Serve), closed loop of N clients, greedy;
- compiled: transformers' `generate` with a static cache at batch N (torch.compile with
  CUDA graphs), the reference the issue's ratios are taken against;
- generate_batch: transformers' own continuous batching (paged attention) on N requests,
  the best of its default and its CUDA-graph settings;
- seed: the seed's design (one eager `generate` per request) at 1 client;
- bound: batch N x measured copy bandwidth / weight bytes (decode reads every weight
  once per step), an upper bound no engine reaches.

    python bench/gpu_throughput.py --config FOLDER [--sizes 135m 1.7b] [--out FILE]

FOLDER holds the SmolLM2-135M config.json and tokenizer; models get random weights (no
download; throughput does not depend on the weights' values), bfloat16. `1.7b` is that
config widened (hidden 2048, 24 layers, intermediate 8192, 32 heads). Needs only torch
and transformers (no Ray). Results go to --out as JSON after every measurement, so a run
cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
import traceback
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deployments.config import ModelConfig  # noqa: E402
from deployments.protocol import GenerationParams  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402

PROMPT = "The history of the river city is long and full of stories about people, work and music. " * 2
# Config overrides of each size, and the client counts it is measured at by default.
SIZES = {
    "135m": ({}, [1, 64]),
    "1.7b": ({"hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 8192,
              "num_attention_heads": 32, "num_key_value_heads": 32}, [64]),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_model(config_folder: Path, overrides: dict, folder: Path) -> None:
    config = AutoConfig.from_pretrained(config_folder, **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(config_folder).save_pretrained(folder)


def ours(
    engine: TransformersEngine, clients: int, seconds: float, new_tokens: int,
    requests: Sequence[GenerationParams] = (),
) -> dict:
    """Closed loop: each client sends its next request when the last one ends. Client i
    sends ``requests[i % len(requests)]``; with none, a greedy request on PROMPT."""
    requests = list(requests) or [GenerationParams(prompt=PROMPT, max_new_tokens=new_tokens, temperature=0)]

    async def run(duration: float) -> tuple[int, list[float], float]:
        deadline = time.monotonic() + duration
        tokens, latencies = 0, []

        async def client(params: GenerationParams) -> None:
            nonlocal tokens
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async for deltas in engine.generate(engine.prepare(params)):
                    last = deltas[-1]
                tokens += last.completion_tokens
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(requests[i % len(requests)]) for i in range(clients)))
        return tokens, latencies, time.perf_counter() - started

    asyncio.run(run(2.0))  # captures this load's CUDA graphs
    tokens, latencies, elapsed = asyncio.run(run(seconds))
    return {"tokens_per_s": tokens / elapsed, "p50_latency_s": statistics.median(latencies),
            "requests": len(latencies)}


def _timed_generate(model, inputs, repeats: int, **kwargs) -> float:
    """Tokens/s of `model.generate` on ``inputs`` (after one untimed call)."""
    with torch.inference_mode():
        model.generate(**inputs, **kwargs)
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        started, tokens = time.perf_counter(), 0
        for _ in range(repeats):
            output = model.generate(**inputs, **kwargs)
            tokens += output[:, inputs["input_ids"].shape[1]:].numel()
        torch.cuda.synchronize() if DEVICE == "cuda" else None
    return tokens / (time.perf_counter() - started)


def compiled_reference(model, tokenizer, batch: int, new_tokens: int) -> dict:
    inputs = tokenizer([PROMPT] * batch, return_tensors="pt").to(DEVICE)
    started = time.perf_counter()
    rate = _timed_generate(model, inputs, 3, max_new_tokens=new_tokens, do_sample=False,
                           cache_implementation="static", pad_token_id=tokenizer.eos_token_id)
    return {"tokens_per_s": rate, "with_compile_s": time.perf_counter() - started}


def seed_design(model, tokenizer, new_tokens: int) -> dict:
    inputs = tokenizer(PROMPT, return_tensors="pt").to(DEVICE)
    rate = _timed_generate(model, inputs, 2, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)
    return {"tokens_per_s": rate}


def generate_batch(model, tokenizer, requests: int, new_tokens: int) -> dict:
    """transformers' continuous batching: default settings, and CUDA graphs on."""
    from transformers import ContinuousBatchingConfig

    ids = tokenizer(PROMPT)["input_ids"]
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=tokenizer.eos_token_id)
    results = {}
    for name, settings in {"default": {}, "cuda_graphs": {"use_cuda_graph": True}}.items():
        try:
            model.set_attn_implementation("paged|sdpa")
            batching = ContinuousBatchingConfig(**settings)
            model.generate_batch(inputs=[ids] * 4, generation_config=config, continuous_batching_config=batching)
            started = time.perf_counter()
            outputs = model.generate_batch(inputs=[ids] * requests, generation_config=config,
                                           continuous_batching_config=batching)
            elapsed = time.perf_counter() - started
            results[name] = sum(len(out.generated_tokens) for out in outputs.values()) / elapsed
        except Exception as exc:  # noqa: BLE001 - report what this transformers lacks
            results[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
        finally:
            model.set_attn_implementation("sdpa")
    rates = [rate for rate in results.values() if isinstance(rate, float)]
    return {"tokens_per_s": max(rates) if rates else None, "settings": results}


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted once each)."""
    if DEVICE != "cuda":
        return float("nan")
    source = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * 10 * source.numel() / (time.perf_counter() - started)


def measure(name: str, row: dict, key: str, function, *args) -> None:
    try:
        row[key] = function(*args)
    except Exception as exc:  # noqa: BLE001 - keep the other measurements
        traceback.print_exc()
        row[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(f"  {name} {key}: {json.dumps(row[key])}", flush=True)


def ratio(row: dict, of: str, to: str) -> float | None:
    a, b = row.get(of, {}).get("tokens_per_s"), row.get(to, {}).get("tokens_per_s")
    return round(a / b, 3) if isinstance(a, float) and isinstance(b, float) and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--clients", type=int, nargs="+", help="client counts (default: per size)")
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                        help="the engine's share: the references run in this process too")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_throughput.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run only)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "new_tokens": args.new_tokens,
        "dtype": "bfloat16",
        "copy_bandwidth_bytes_per_s": copy_bandwidth(),
        "runs": [],
    }
    print(f"device: {record['device']}, torch {record['torch']}, transformers {record['transformers']}, "
          f"copy {record['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        overrides, default_clients = SIZES[size]
        client_counts = args.clients or default_clients
        with tempfile.TemporaryDirectory() as folder:
            build_model(args.config, overrides, Path(folder))
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE).eval()
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            engine = TransformersEngine(
                ModelConfig(source=folder, max_batch_size=max(client_counts),
                            gpu_memory_utilization=args.gpu_memory_utilization),
                DEVICE,
            )
            engine.load()
            print(f"{size}: {weight_bytes / 2 / 1e6:.0f}M parameters", flush=True)
            for clients in client_counts:
                row = {"size": size, "parameters": weight_bytes // 2, "clients": clients,
                       "bound": {"tokens_per_s": clients * record["copy_bandwidth_bytes_per_s"] / weight_bytes}}
                measure(size, row, "ours", ours, engine, clients, args.seconds, args.new_tokens)
                measure(size, row, "compiled", compiled_reference, model, tokenizer, clients, args.new_tokens)
                if clients == 1:
                    measure(size, row, "seed", seed_design, model, tokenizer, args.new_tokens)
                else:
                    measure(size, row, "generate_batch", generate_batch, model, tokenizer, clients, args.new_tokens)
                row["ours_over_compiled"] = ratio(row, "ours", "compiled")
                row["ours_over_bound"] = ratio(row, "ours", "bound")
                row["ours_over_seed"] = ratio(row, "ours", "seed")
                row["ours_over_generate_batch"] = ratio(row, "ours", "generate_batch")
                graphs = getattr(engine._decoding, "decoder", None)
                row["graphs_captured"] = graphs.graphs_captured if graphs else 0
                record["runs"].append(row)
                args.out.write_text(json.dumps(record, indent=1) + "\n")
                print(f"{size} x{clients}: ours/compiled {row['ours_over_compiled']}, "
                      f"ours/bound {row['ours_over_bound']}, ours/seed {row['ours_over_seed']}, "
                      f"ours/generate_batch {row['ours_over_generate_batch']}", flush=True)
            engine.close()
            del model, engine
            gc.collect()
            torch.cuda.empty_cache() if DEVICE == "cuda" else None


if __name__ == "__main__":
    main()
