"""Soak: many clients for a while; the status of every answer, and whether the replicas'
memory grew.

    .venv/bin/python bench/soak.py --clients 64 --seconds 60

Starts a local cluster with the app of configs/serve.yaml (rate limits on, as
configured, so 429s are part of the picture; `--no-limits` turns them off), drives it
with mixed requests from many client addresses (each waits out a `Retry-After`, as a
well-behaved client does), then prints the status histogram,
latency percentiles per status, connection errors, and each replica process's resident
memory at the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import httpx  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import free_port, percentile  # noqa: E402
from bench.throughput import request_mix  # noqa: E402
from serve_app.app import build_app  # noqa: E402
from serve_app.args import AppArgs  # noqa: E402


def replica_memory() -> dict[str, float]:
    """Resident memory (MiB) of each Serve replica process of the app, found in the GCS's
    actor table (the state API would need the dashboard), and of each model replica's
    engine process, which holds the model."""
    memory = {}
    for actor in ray._private.state.actors().values():
        if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith("ServeReplica:soak:") and actor["Pid"]:
            name = f"{actor['ActorClassName'].split(':')[-1]} (pid {actor['Pid']})"
            replica = psutil.Process(actor["Pid"])
            memory[name] = replica.memory_info().rss / 2**20
            for child in replica.children():
                if "deployments.engine_process" in child.cmdline():
                    memory[f"{name}, engine process"] = child.memory_info().rss / 2**20
    return memory


async def soak(
    url: str, clients: int, seconds: float, network: str = "198.51.100"
) -> tuple[Counter, dict[int, list[float]]]:
    mix = request_mix(512, seed=1)
    statuses: Counter = Counter()
    latencies: dict[int, list[float]] = {}
    deadline = time.monotonic() + seconds

    async def client(number: int) -> None:
        # Each client has an address of its own (the app trusts 127.0.0.1 as a proxy).
        headers = {"X-Forwarded-For": f"{network}.{number % 250 + 1}", "X-Request-Timeout": "120"}
        turn = number
        async with httpx.AsyncClient(timeout=180) as http:
            while time.monotonic() < deadline:
                body = mix[turn % len(mix)]
                turn += clients
                started = time.perf_counter()
                retry_after = 0.0
                try:
                    response = await http.post(f"{url}/generate", json=body, headers=headers)
                    status = response.status_code
                    retry_after = float(response.headers.get("Retry-After", 0))
                except httpx.TransportError:
                    status = -1  # connection error
                statuses[status] += 1
                latencies.setdefault(status, []).append((time.perf_counter() - started) * 1000)
                # A well-behaved client: it waits as long as a 429 or 503 asks.
                await asyncio.sleep(min(retry_after, max(0.0, deadline - time.monotonic())))

    await asyncio.gather(*(client(i) for i in range(clients)))
    return statuses, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup-seconds", type=float, default=10,
                        help="load before the first memory reading: first-use allocations are not growth")
    parser.add_argument("--no-limits", action="store_true")
    args = parser.parse_args()
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    raw_args = config["applications"][0]["args"]
    # Set before validation: the validators turn trusted_proxies into networks.
    raw_args["rate_limits"].update(enabled=not args.no_limits, trusted_proxies=["127.0.0.1/32"])
    app_args = AppArgs.model_validate(raw_args)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="soak", route_prefix="/")
    try:
        # Other addresses: the warm-up spends none of the soak clients' rate budget.
        asyncio.run(soak(f"http://127.0.0.1:{port}", args.clients, args.warmup_seconds, network="203.0.113"))
        before = replica_memory()
        statuses, latencies = asyncio.run(soak(f"http://127.0.0.1:{port}", args.clients, args.seconds))
        after = replica_memory()
    finally:
        serve.shutdown()
        ray.shutdown()
    total = sum(statuses.values())
    print(f"\n{args.clients} clients, {args.seconds:.0f} s, {total} requests")
    print(f"{'status':>7} {'count':>6} {'share':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for status in sorted(statuses):
        values = latencies[status]
        label = "conn err" if status == -1 else str(status)
        print(f"{label:>7} {statuses[status]:>6} {statuses[status] / total:6.1%} "
              f"{statistics.median(values):8.0f} {percentile(values, 0.99):8.0f}")
    print("\nreplica resident memory (MiB), start -> end")
    for name in sorted(set(before) | set(after)):
        start, end = before.get(name), after.get(name)
        change = f"{end - start:+.0f}" if start is not None and end is not None else "replaced"
        print(f"  {name}: {start or 0:.0f} -> {end or 0:.0f} ({change})")


if __name__ == "__main__":
    main()
