"""What fair share of the batch gives: a quiet tenant's latency beside a noisy one, the
replica's tokens/s, and the shares of two saturating tenants weighted 1:3, with
`scheduling_policy: fifo` against `fair`, through `serve run` on this machine.

    python bench/fairness.py [--rounds 2] [--seconds 40] [--share-seconds 30]

One `serve run` of configs/serve.yaml serves the embedded SmolLM2-135M twice, as model
`fifo` and model `fair` (one replica each, the same dtype, threads, batch of 32 rows
and prefix cache; only the scheduling policy differs), with API keys on: each tenant
is a key. The models take turns, round after round, one at a time (the other idles).
Each model's replicas accept 128 requests, so that requests wait in the replica (where
the policy orders them), not in Serve's router (first come, first served). Every
request streams from /v1/completions with `ignore_eos` (fixed lengths) and greedy
decoding, and `stream_options.continuous_usage_stats`, so every chunk says how many
tokens the request has so far.

- contention: tenant `noisy` keeps 48 requests of 128 new tokens in flight (closed
  loop), its clients starting --spread-s apart in all, so that rows free up one at a
  time as in steady traffic (started together, equal requests would hold the batch in
  lockstep waves); 5 s after the last has started, tenants `quiet1`..`quiet3` each send
  one request of 32 new tokens at a time (closed loop) for --seconds. Reported: the
  quiet requests' time to first token and latency (p50, p99, from the client's send; a
  request still waiting at the end counts what it had waited), and every tenant's
  tokens/s over that window.
- shares: tenants `light` (weight 1) and `heavy` (weight 3) each keep 32 requests of
  32 new tokens in flight (started over --spread-s / 2); generated tokens of each over
  --share-seconds, from 15 s after the last client started (the first rows go to
  whoever comes first, while rows are free; shares settle as rows turn over).

Writes JSON to --out (machine, every run, medians, fair/fifo ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import machine, percentile, write_record  # noqa: E402
from bench.service import Service  # noqa: E402

POLICIES = ("fifo", "fair")
TENANTS = {"noisy": 1, "quiet1": 1, "quiet2": 1, "quiet3": 1, "light": 1, "heavy": 3}
WARM_IN_S = 5
SHARES_WARM_IN_S = 15  # about two of a share request's times here
DRAIN_S = 3  # after clients leave, for the replica to drop their requests
PROMPTS = ["The history of the city goes back two thousand years, to a settlement on an island",
           "Write a short story about a lighthouse keeper who finds a message in a bottle",
           "Explain how a bicycle stays upright while it moves, in plain words",
           "List the steps to bake a loaf of bread at home, with the times for each"]


def configure(config: dict) -> None:
    """Two models alike but for the scheduling policy; keys on, no limits but weights."""
    app = config["applications"][0]["args"]
    [model] = app["models"]
    model.update(autoscaling=None, num_replicas=1, max_batch_size=32, max_ongoing_requests=128, max_queued_requests=64,
                 num_cpus=0.25)
    app["models"] = [{**model, "name": policy, "scheduling_policy": policy} for policy in POLICIES]
    app["auth"] = {"enabled": True}
    app["rate_limits"] = {
        "enabled": True, "storage": "ray", "default": {"requests": [], "tokens": []},
        "keys": {name: {"requests": [], "tokens": [], "weight": weight} for name, weight in TENANTS.items()},
    }


class Tenant:
    """One tenant's closed-loop clients and what they saw: per request, the client's
    send, first token and end times (None until then); per chunk, (time, tokens added)."""

    def __init__(self, url: str, key: str, model: str, new_tokens: int) -> None:
        self.url, self.key, self.model, self.new_tokens = url, key, model, new_tokens
        self.requests: list[list[float | None]] = []
        self.token_times: list[tuple[float, int]] = []
        self.errors: list[str] = []

    async def one(self, http: httpx.AsyncClient, number: int) -> None:
        body = {"model": self.model, "prompt": PROMPTS[number % len(PROMPTS)], "max_tokens": self.new_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        times: list[float | None] = [time.monotonic(), None, None]  # sent, first token, end
        self.requests.append(times)
        seen = 0
        async with http.stream("POST", f"{self.url}/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {self.key}"}) as response:
            if response.status_code != 200:
                self.errors.append(f"{response.status_code} {(await response.aread())[:200]!r}")
                await asyncio.sleep(0.5)
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                usage = json.loads(line[6:]).get("usage")
                if usage and usage["completion_tokens"] > seen:
                    now = time.monotonic()
                    times[1] = times[1] or now
                    self.token_times.append((now, usage["completion_tokens"] - seen))
                    seen = usage["completion_tokens"]
        times[2] = time.monotonic()

    async def loop(self, http: httpx.AsyncClient, number: int) -> None:
        while True:
            await self.one(http, number)
            number += 1

    def tokens_between(self, start: float, end: float) -> int:
        return sum(tokens for moment, tokens in self.token_times if start <= moment < end)


async def run_tenants(url: str, keys: dict[str, str], model: str, plan: dict[str, tuple[int, int, float, float]],
                      window: tuple[float, float]) -> dict[str, Tenant]:
    """``plan``: tenant -> (concurrent requests, new tokens, seconds after now its first
    client starts, seconds over which its clients start, evenly, in turn with the other
    tenants' when they overlap). At the window's end every client leaves, its request
    unfinished (the replica then drops it), and the replica is given a few seconds to
    drain."""
    now = time.monotonic()
    tenants = {name: Tenant(url, keys[name], model, tokens) for name, (_, tokens, _, _) in plan.items()}
    limits = httpx.Limits(max_connections=sum(c for c, *_ in plan.values()) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(name: str, number: int, delay: float):
            await asyncio.sleep(delay)
            await tenants[name].loop(http, number)

        clients = asyncio.gather(*(
            client(name, n, start + spread * n / concurrent)
            for name, (concurrent, _, start, spread) in plan.items() for n in range(concurrent)
        ))
        try:
            await asyncio.wait_for(clients, timeout=now + window[1] - time.monotonic())
        except TimeoutError:
            pass
    await asyncio.sleep(DRAIN_S)
    return tenants


def contention(url: str, keys: dict[str, str], model: str, seconds: float, spread_s: float) -> dict:
    started = time.monotonic()
    warm_in = spread_s + WARM_IN_S
    plan = {"noisy": (48, 128, 0, spread_s)} | {f"quiet{n}": (1, 32, warm_in, 0) for n in (1, 2, 3)}
    tenants = asyncio.run(run_tenants(url, keys, model, plan, (warm_in, warm_in + seconds)))
    opens, closes = started + warm_in, started + warm_in + seconds
    # A quiet request still waiting at the window's end counts with what it had waited
    # by then (a lower bound), so a starved tenant is not left out of its percentiles.
    quiet = [r for n in (1, 2, 3) for r in tenants[f"quiet{n}"].requests]
    ttft = [(first or closes) - sent for sent, first, _ in quiet]
    latency = [(end or closes) - sent for sent, _, end in quiet]
    tokens = {name: tenant.tokens_between(opens, closes) for name, tenant in tenants.items()}
    return {
        "quiet_requests": len(quiet), "quiet_unfinished_at_end": sum(end is None for _, _, end in quiet),
        "quiet_ttft_p50_s": round(percentile(ttft, 0.5), 3), "quiet_ttft_p99_s": round(percentile(ttft, 0.99), 3),
        "quiet_latency_p50_s": round(percentile(latency, 0.5), 3),
        "quiet_latency_p99_s": round(percentile(latency, 0.99), 3),
        "tokens_per_s": round(sum(tokens.values()) / seconds, 1),
        "tokens_per_s_by_tenant": {name: round(count / seconds, 1) for name, count in tokens.items()},
        "errors": [e for tenant in tenants.values() for e in tenant.errors][:5],
    }


def shares(url: str, keys: dict[str, str], model: str, seconds: float, spread_s: float) -> dict:
    started = time.monotonic()
    warm_in = spread_s + SHARES_WARM_IN_S
    plan = {"light": (32, 32, 0, spread_s), "heavy": (32, 32, 0, spread_s)}
    tenants = asyncio.run(run_tenants(url, keys, model, plan, (warm_in, warm_in + seconds)))
    opens, closes = started + warm_in, started + warm_in + seconds
    tokens = {name: tenant.tokens_between(opens, closes) for name, tenant in tenants.items()}
    return {"tokens": tokens, "heavy_over_light": round(tokens["heavy"] / max(tokens["light"], 1), 3),
            "tokens_per_s": round(sum(tokens.values()) / seconds, 1),
            "errors": [e for tenant in tenants.values() for e in tenant.errors][:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--share-seconds", type=float, default=30)
    parser.add_argument("--spread-s", type=float, default=20,
                        help="over how long the noisy tenant's clients start (about one of its requests' time)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fairness.json"))
    parser.add_argument("--summarize", type=Path, metavar="JSON",
                        help="only recompute the summary of a record this script wrote")
    args = parser.parse_args()
    if args.summarize is not None:
        record = json.loads(args.summarize.read_text())
        record["summary"] = summarize(record)
        print(json.dumps(record["summary"], indent=1))
        write_record(args.summarize, record)
        return
    keys = {name: secrets.token_hex(16) for name in TENANTS}
    record = {
        "machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "embedded SmolLM2-135M-Instruct via serve run configs/serve.yaml, as models fifo and fair",
        "max_batch_size": 32, "seconds": args.seconds, "share_seconds": args.share_seconds,
        "spread_s": args.spread_s,
        "weights": TENANTS, "runs": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="fairness-", dir="/tmp"))
    env = {"TEXTGEN_API_KEYS": ",".join(f"{name}:{key}" for name, key in keys.items())}
    with Service(ROOT, scratch / "serve.log", configure=configure, env=env) as service:
        for policy in POLICIES:  # warm-up: every model compiles and caches alike
            asyncio.run(run_tenants(service.url, keys, policy, {"noisy": (8, 16, 0, 0)}, (0, 3)))
        for round_number in range(args.rounds):
            for policy in POLICIES:
                run = {"round": round_number, "policy": policy,
                       "contention": contention(service.url, keys, policy, args.seconds, args.spread_s),
                       "shares": shares(service.url, keys, policy, args.share_seconds, args.spread_s / 2)}
                record["runs"].append(run)
                print(json.dumps(run), flush=True)
                write_record(args.out, record)
    record["summary"] = summarize(record)
    print(json.dumps(record["summary"], indent=1))
    write_record(args.out, record)


def summarize(record: dict) -> dict:
    """Each policy's medians over the rounds, and the ratios the issue asks for."""
    summary: dict[str, dict | float] = {}
    for policy in POLICIES:
        runs = [r for r in record["runs"] if r["policy"] == policy]
        summary[policy] = {
            key: round(statistics.median(r["contention"][key] for r in runs), 3)
            for key in ("quiet_ttft_p50_s", "quiet_ttft_p99_s", "quiet_latency_p50_s", "quiet_latency_p99_s",
                        "tokens_per_s")
        } | {
            "shares_tokens_per_s": round(statistics.median(r["shares"]["tokens_per_s"] for r in runs), 1),
            "heavy_over_light": round(statistics.median(r["shares"]["heavy_over_light"] for r in runs), 3),
        }
    fifo, fair = summary["fifo"], summary["fair"]
    summary["fifo_over_fair_quiet_ttft_p99"] = round(fifo["quiet_ttft_p99_s"] / fair["quiet_ttft_p99_s"], 2)
    summary["fifo_over_fair_quiet_latency_p99"] = round(fifo["quiet_latency_p99_s"] / fair["quiet_latency_p99_s"], 2)
    summary["fair_over_fifo_tokens_per_s"] = round(fair["tokens_per_s"] / fifo["tokens_per_s"], 3)
    summary["fair_over_fifo_shares_tokens_per_s"] = round(fair["shares_tokens_per_s"] / fifo["shares_tokens_per_s"], 3)
    return summary


if __name__ == "__main__":
    main()
