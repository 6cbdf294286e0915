"""Prefix-aware routing across two model replicas, through Serve: the multi-turn chat load
of bench/prefix_cache.py (workload A) over HTTP with each request router in turn.

    python bench/prefix_routing.py [--rounds 2] [--conversations 16] [--turns 6]

Routers: `power_of_two` (Serve's default), `prefix_affinity` (ours, serve_app/routing.py)
and `ray_prefix_cache_affinity` (Ray Serve LLM's PrefixCacheAffinityRouter, given the
text of our requests' messages by a small subclass, since it reads only its own request
types). Everything else alike: the embedded model, two replicas with one torch thread
each (this machine has two cores), the prefix cache on, the same conversations; each
run deploys the app afresh, so every cache starts cold. Reported per router: time to
first token p50 (streamed /v1/chat/completions), tokens/s, and the hit rate
(usage.prompt_tokens_details.cached_tokens over prompt tokens). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import free_port, machine, percentile, write_record  # noqa: E402
from bench.prefix_cache import add_workload_arguments, question, system_prompt  # noqa: E402

ROUTERS = ("power_of_two", "prefix_affinity", "ray_prefix_cache_affinity")
MODEL = "smollm2-135m-instruct"


def deploy(router: str, conversations: int):
    """The app with two model replicas behind ``router``; returns its URL."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    import serve_app.app as app_module
    from serve_app.args import AppArgs, IngressArgs, ModelArgs, RateLimitArgs

    model = ModelArgs(
        name=MODEL, num_replicas=2, autoscaling=None, num_cpus=0.5, cpu_threads=1, max_batch_size=conversations,
        request_router="power_of_two" if router == "ray_prefix_cache_affinity" else router,
    )
    options = app_module.model_deployment_options
    if router == "ray_prefix_cache_affinity":
        def with_ray_router(model_args, accelerator):
            chosen = options(model_args, accelerator)
            chosen["request_router_config"] = RequestRouterConfig(
                request_router_class="bench.ray_prefix_router:RayPrefixCacheAffinityRouter",
                request_router_kwargs={"imbalanced_threshold": 8},
            )
            return chosen

        app_module.model_deployment_options = with_ray_router
    try:
        app = app_module.build_app(AppArgs(
            models=[model], ingress=IngressArgs(num_cpus=0.25), rate_limits=RateLimitArgs(enabled=False),
        ))
    finally:
        app_module.model_deployment_options = options
    serve.run(app, name="routing", route_prefix="/")


async def conversation(http: httpx.AsyncClient, url: str, number: int, turns: int, system: str,
                       new_tokens: int, results: list[dict]) -> None:
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": question(number, turn)})
        body = {"model": MODEL, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        submitted, first, answer, usage = time.perf_counter(), None, "", None
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    text = choice["delta"].get("content")
                    if text:
                        first = first or time.perf_counter()
                        answer += text
        results.append({"ttft_s": (first or time.perf_counter()) - submitted, "prompt_tokens": usage["prompt_tokens"],
                        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                        "completion_tokens": usage["completion_tokens"]})
        messages.append({"role": "assistant", "content": answer})


def measure(url: str, args, system: str) -> dict:
    results: list[dict] = []

    async def everyone() -> None:
        async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=args.conversations + 4)) as http:
            await asyncio.gather(*(conversation(http, url, number, args.turns, system, args.new_tokens, results)
                                   for number in range(args.conversations)))

    started = time.perf_counter()
    asyncio.run(everyone())
    elapsed = time.perf_counter() - started
    ttft = [result["ttft_s"] for result in results]
    return {
        "seconds": round(elapsed, 2), "requests": len(results),
        "tokens_per_s": round(sum(r["completion_tokens"] for r in results) / elapsed, 2),
        "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p90_s": round(percentile(ttft, 0.9), 3),
        "hit_rate": round(sum(r["cached_tokens"] for r in results) / sum(r["prompt_tokens"] for r in results), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix_routing.json"))
    args = parser.parse_args()
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # the replicas import bench's router too
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    from transformers import AutoTokenizer

    from deployments.transformers_engine import prepare_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_embedded_model())
    system = system_prompt(lambda text: len(tokenizer(text)["input_ids"]), args.system_tokens)
    record = {
        "machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": f"embedded {MODEL}", "replicas": 2, "cpu_threads_per_replica": 1,
        "conversations": args.conversations, "turns": args.turns, "new_tokens": args.new_tokens,
        "system_prompt_tokens": len(tokenizer(system)["input_ids"]), "greedy": True, "runs": [],
    }
    try:
        for round_number in range(args.rounds):
            for router in ROUTERS:
                deploy(router, args.conversations)
                result = measure(url, args, system)
                serve.delete("routing")
                record["runs"].append({"round": round_number, "router": router, **result})
                print(f"round {round_number} {router:>26}: ttft p50 {result['ttft_p50_s']:.2f} s, "
                      f"{result['tokens_per_s']:.1f} tokens/s, hit rate {result['hit_rate']:.2f}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    record["summary"] = {
        router: {
            field: statistics.median(r[field] for r in record["runs"] if r["router"] == router)
            for field in ("ttft_p50_s", "tokens_per_s", "hit_rate")
        }
        for router in ROUTERS
    }
    print(json.dumps(record["summary"], indent=1))
    write_record(args.out, record)


if __name__ == "__main__":
    main()
