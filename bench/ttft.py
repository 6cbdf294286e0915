"""Time to first token beside full-response latency, for streamed requests.

    TEXTGEN_RATE_LIMIT=off make serve          # in another terminal
    .venv/bin/python bench/ttft.py --concurrency 1 16 --seconds 30

N clients each stream POST /generate requests back to back (32 new tokens, greedy);
for every request the client records when the first text event arrived (TTFT) and when
`[DONE]` did (full response). Prints p50/p99 of both per concurrency, from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import percentile  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three most important things about software engineering are",
    "Water boils at",
]


async def stream_once(client: httpx.AsyncClient, url: str, prompt: str, max_new_tokens: int) -> tuple[float, float]:
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = None
    async with client.stream("POST", f"{url}/generate", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                break
            if first is None and json.loads(payload).get("text"):
                first = time.perf_counter()
    done = time.perf_counter()
    return ((first or done) - started) * 1000, (done - started) * 1000


async def drive(url: str, concurrency: int, seconds: float, max_new_tokens: int) -> tuple[list[float], list[float]]:
    ttft, full = [], []
    deadline = time.monotonic() + seconds

    async def client_loop(number: int) -> None:
        turn = number
        async with httpx.AsyncClient(timeout=300) as client:
            while time.monotonic() < deadline:
                first, whole = await stream_once(client, url, PROMPTS[turn % len(PROMPTS)], max_new_tokens)
                turn += 1
                ttft.append(first)
                full.append(whole)

    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    return ttft, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup-seconds", type=float, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    for concurrency in args.concurrency:
        asyncio.run(drive(args.url, concurrency, args.warmup_seconds, args.max_new_tokens))
        ttft, full = asyncio.run(drive(args.url, concurrency, args.seconds, args.max_new_tokens))
        results[concurrency] = {
            "streams": len(ttft),
            "ttft_p50_ms": statistics.median(ttft), "ttft_p99_ms": percentile(ttft, 0.99),
            "full_p50_ms": statistics.median(full), "full_p99_ms": percentile(full, 0.99),
        }
    print(f"\nstreamed POST /generate, {args.max_new_tokens} new tokens, {args.seconds:.0f} s per concurrency")
    print(f"{'streams':>8} {'done':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'full p50':>9} {'full p99':>9}  (ms)")
    for concurrency, row in results.items():
        print(
            f"{concurrency:>8} {row['streams']:>6} {row['ttft_p50_ms']:>9.0f} {row['ttft_p99_ms']:>9.0f}"
            f" {row['full_p50_ms']:>9.0f} {row['full_p99_ms']:>9.0f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "args": vars(args)}, default=str, indent=2))


if __name__ == "__main__":
    main()
