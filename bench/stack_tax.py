"""What the serving stack costs one request at a time, split in two: the engine slowed by
the Ray cluster merely running beside it, and the hop through HTTP and Serve.

    .venv/bin/python bench/stack_tax.py --turns 5

Times the same greedy requests (a long prompt with few and with more new tokens, a short
prompt with many) in this order: the in-process engine with no Ray running; then, with
the local config's cluster up, the in-process engine again, the service without
streaming, and the service streamed. Prints median milliseconds and the ratios to the
quiet engine. On a 2-core machine the idle cluster's own work (controller loop, GCS,
proxy, agents) wakes torch's threads out of step; this makes that visible.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import httpx  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import free_port  # noqa: E402
from bench.throughput import WORDS, engine_once, load_engine  # noqa: E402


def shapes() -> dict[str, tuple[str, int]]:
    long_prompt = " ".join(random.Random(3).choice(WORDS) for _ in range(250))
    return {
        "250 words + 8": (long_prompt, 8),
        "250 words + 64": (long_prompt, 64),
        "6 words + 128": ("Tell me a long story about a cat", 128),
    }


def median_ms(call, turns: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(turns):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()

    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.args import AppArgs

    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    app_args = AppArgs.model_validate(config["applications"][0]["args"])
    app_args.rate_limits.enabled = False
    engine = load_engine()

    def in_process(prompt: str, tokens: int):
        body = {"prompt": prompt, "max_new_tokens": tokens, "temperature": 0}
        return lambda: asyncio.run(engine_once(engine, body))

    times: dict[str, dict[str, float]] = {name: {} for name in shapes()}
    for name, (prompt, tokens) in shapes().items():
        times[name]["engine, no Ray"] = median_ms(in_process(prompt, tokens), args.turns)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="tax", route_prefix="/")
    url = f"http://127.0.0.1:{port}/generate"

    def served(prompt: str, tokens: int, stream: bool):
        body = {"prompt": prompt, "max_new_tokens": tokens, "temperature": 0, "stream": stream}

        def call():
            with httpx.stream("POST", url, json=body, timeout=300) as response:
                response.read()
                response.raise_for_status()
        return call

    try:
        for name, (prompt, tokens) in shapes().items():
            times[name]["engine, Ray up"] = median_ms(in_process(prompt, tokens), args.turns)
            times[name]["served"] = median_ms(served(prompt, tokens, False), args.turns)
            times[name]["served, streamed"] = median_ms(served(prompt, tokens, True), args.turns)
    finally:
        serve.shutdown()
        ray.shutdown()
        engine.close()  # a scheduler thread still running at interpreter exit aborts it

    columns = list(next(iter(times.values())))
    print(f"\nmedian ms of {args.turns} greedy requests, one at a time (ratio to the engine with no Ray)")
    print(f"{'request':>16} " + " ".join(f"{c:>22}" for c in columns))
    for name, row in times.items():
        quiet = row["engine, no Ray"]
        print(f"{name:>16} " + " ".join(f"{row[c]:>14.0f} ({row[c] / quiet:4.2f}x)" for c in columns))


if __name__ == "__main__":
    main()
