"""Added latency of cluster-wide rate limiting, measured side by side in one run.

    .venv/bin/python bench/rate_limit_overhead.py --seconds 60 --concurrency 1 32

Starts a local Ray cluster and the app (the embedded model by default, two ingress
replicas, limiter counters in the Ray actor) with API keys on and two keys that differ
only in their quota: `unlimited` (no limits: the limiter is never called) and
`limited` (a request limit and a token quota too large to refuse anything, so every
request costs a limiter check and a token charge). N concurrent clients alternate the
two keys request by request, so both see the same load, batches and machine noise;
the difference of their latencies is what the limiter adds. Clients far from their
limits have the check overlapped with the model call (serve_app.access.admit_around).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import free_port, percentile  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.args import AppArgs, AuthArgs, IngressArgs, ModelArgs, QuotaArgs, RateLimitArgs  # noqa: E402

KEYS = {"unlimited": "bench-unlimited-key-0123456789", "limited": "bench-limited-key-0123456789"}


def app_args(source: str, keys_file: Path) -> AppArgs:
    return AppArgs(
        models=[ModelArgs(source=source, num_cpus=0.5, num_replicas=1, autoscaling=None, max_batch_size=16)],
        ingress=IngressArgs(num_replicas=2, num_cpus=0.25),
        auth=AuthArgs(enabled=True, keys_file=keys_file),
        rate_limits=RateLimitArgs(
            keys={
                "unlimited": QuotaArgs(requests=[], tokens=[]),
                "limited": QuotaArgs(requests=["1000000/minute"], tokens=["1000000000/minute"]),
            }
        ),
    )


async def drive(url: str, seconds: float, concurrency: int, body: dict) -> list[list[tuple[str, float]]]:
    """Each client's (key name, latency ms) in order; clients alternate the keys."""
    per_client: list[list[tuple[str, float]]] = [[] for _ in range(concurrency)]
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds

    async def client(number: int) -> None:
        turn = number
        async with httpx.AsyncClient(timeout=120) as http:
            while time.monotonic() < deadline:
                name = list(KEYS)[turn % 2]
                turn += 1
                started = time.perf_counter()
                response = await http.post(
                    f"{url}/generate", json=body, headers={"Authorization": f"Bearer {KEYS[name]}"}
                )
                elapsed = (time.perf_counter() - started) * 1000
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                per_client[number].append((name, elapsed))

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    if set(statuses) != {200}:
        raise SystemExit(f"unexpected statuses: {statuses}")
    return per_client


def summarize(per_client: list[list[tuple[str, float]]]) -> dict:
    """p50/p99 per key, their difference, and the median of paired differences: each
    limited request against the same client's adjacent unlimited one, which cancels most
    of the load's drift; with a bootstrap 95% interval, since at saturation one batch
    more or less moves a latency by far more than the limiter costs."""
    latencies = {name: [ms for sequence in per_client for key, ms in sequence if key == name] for name in KEYS}
    rows = {
        name: {"requests": len(values), "p50_ms": statistics.median(values), "p99_ms": percentile(values, 0.99)}
        for name, values in latencies.items()
    }
    pairs = []
    for sequence in per_client:
        # An odd last request has no partner (strict=False).
        for (first, first_ms), (_, second_ms) in zip(sequence[::2], sequence[1::2], strict=False):
            limited, unlimited = (first_ms, second_ms) if first == "limited" else (second_ms, first_ms)
            pairs.append(limited - unlimited)
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(pairs, k=len(pairs))) for _ in range(1000))
    return {
        "rows": rows,
        "added": {stat: rows["limited"][stat] - rows["unlimited"][stat] for stat in ("p50_ms", "p99_ms")},
        "paired_median_ms": statistics.median(pairs),
        "paired_median_ci95_ms": (medians[25], medians[974]),
        "pairs": len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup-seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-new-tokens", type=int, default=1)
    parser.add_argument("--source", default="embedded", help="model source (default: embedded)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with tempfile.TemporaryDirectory() as folder:
        keys_file = Path(folder) / "keys"
        keys_file.write_text("".join(f"{name}:{key}\n" for name, key in KEYS.items()))
        serve.run(build_app(app_args(args.source, keys_file)), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "The capital of France is", "max_new_tokens": args.max_new_tokens, "temperature": 0}
        results = {}
        for concurrency in args.concurrency:
            asyncio.run(drive(url, args.warmup_seconds, concurrency, body))
            results[concurrency] = summarize(asyncio.run(drive(url, args.seconds, concurrency, body)))
    serve.shutdown()
    ray.shutdown()

    print(f"\nmax_new_tokens={args.max_new_tokens}, {args.seconds:.0f} s per concurrency, same run")
    print(f"{'clients':>7} {'':>22} {'requests':>9} {'p50 ms':>9} {'p99 ms':>9}")
    for concurrency, result in results.items():
        for name, label in (("unlimited", "without limiting"), ("limited", "with limiting")):
            row = result["rows"][name]
            print(f"{concurrency:>7} {label:>22} {row['requests']:>9} {row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f}")
        added = result["added"]
        print(f"{concurrency:>7} {'added by the limiter':>22} {'':>9} {added['p50_ms']:>9.1f} {added['p99_ms']:>9.1f}")
        low, high = result["paired_median_ci95_ms"]
        print(
            f"{concurrency:>7} {'paired median added':>22} {result['pairs']:>9} "
            f"{result['paired_median_ms']:>9.1f}   (95% CI {low:.1f} .. {high:.1f} ms)"
        )
    if 32 in results:
        low, high = results[32]["paired_median_ci95_ms"]
        verdict = "met" if high <= 2 else ("not resolved at this noise" if low <= 2 else "NOT met")
        print(f"target at 32 clients: <= 2 ms added at p50 -> {verdict}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "args": vars(args)}, default=str, indent=2))



if __name__ == "__main__":
    main()
