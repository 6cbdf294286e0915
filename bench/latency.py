"""Sequential latency of one request shape against a running service.

    .venv/bin/python bench/latency.py --url http://127.0.0.1:8000 --requests 50 --max-new-tokens 8

Prints p50/p90/p99 client-side latency (and the server's own latency_ms) in ms. One
client at a time: this measures the serving path's overhead, not throughput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import percentile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()
    body = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "temperature": 0}
    client_ms, server_ms = [], []
    with httpx.Client(timeout=120) as client:
        for attempt in range(args.warmup + args.requests):
            started = time.perf_counter()
            response = client.post(f"{args.url}/generate", json=body)
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if attempt >= args.warmup:
                client_ms.append(elapsed)
                server_ms.append(response.json()["latency_ms"])
    print(f"{args.requests} requests, {args.max_new_tokens} new tokens, one at a time")
    for name, values in (("client", client_ms), ("server latency_ms", server_ms)):
        print(
            f"{name:>18}: p50 {statistics.median(values):7.1f}  p90 {percentile(values, 0.9):7.1f}"
            f"  p99 {percentile(values, 0.99):7.1f} ms"
        )


if __name__ == "__main__":
    main()
