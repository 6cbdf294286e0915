"""Serve's default autoscaling policy against the generation policy, on the same bursty
mixed load, in the simulated GPU cluster.

    .venv/bin/python -m bench.autoscaling --rounds 2      # about 22 minutes

Each run starts a fresh simulated cluster (bench/simulated_cluster.py: no GPU node at
start, one launched per model replica) and deploys configs/serve.simulated.yaml with one
change: the model is the fake engine standing in for a GPU replica, 8 batch rows and one
token per row every 25 ms whatever the batch size (a GPU's decode step barely depends on
it), so that a second replica adds capacity as on a real cluster; on this machine's two
cores a second CPU replica would not. Replicas: 1 to 2. Four configurations:

    generation            its defaults: 16 sequences (a batch running, one waiting) or
                          8 x 128 tokens owed
    generation_8_2048     8 sequences (a full batch) or 8 x 256 tokens owed
    ongoing_requests_8    Serve's default policy, 8 requests in flight (a full batch)
    ongoing_requests_16   Serve's default policy, 16 in flight (a batch running, one waiting)

The load, open loop (every arrival is sent on time, whatever is in flight), the same
seeded schedule (Poisson arrivals) for every run:

    0-25 s   short flood: 18 requests/s of 16 new tokens (0.4 s in a row; 7 rows busy)
    25-55 s  long burst: 0.7/s long (384 new tokens, 9.6 s in a row) plus 2/s short
    55-75 s  quiet: 1/s short

A refused request (503, when every replica and the ingress's queue are full) is counted,
not retried. Runs alternate the configurations (generation, ongoing_requests_8, ...)
so that drift of the machine hits all. Reported per run, in seconds from the load's start:
when a second GPU node is up, a second replica runs and it gives its first token, and
when the second replica and its node are gone again; the most replicas in each burst;
503s; p50/p99 latency of the short flood's requests and of the long burst's long and
short ones; replica-seconds during the load (what the GPUs cost).
Writes bench/results/autoscaling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

from bench.common import free_port, machine
from bench.simulated_cluster import (
    ROOT, SimulatedCluster, Timeline, load_serve_config, open_loop, stop_on_sigterm, summarize, to_json,
)
from serve_app.args import AutoscalingArgs
from tests.fakes import FAKE_ENGINE, fake_source

APP, MODEL = "textgen", "sim-gpu"
DEPLOYMENT = f"Model-{MODEL}"
ROWS, STEP_S = 8, 0.025
SHORT, LONG = 16, 384
PHASES = [  # (start s, end s, short requests/s, long requests/s)
    (0, 25, 18.0, 0.0),
    (25, 55, 2.0, 0.7),
    (55, 75, 1.0, 0.0),
]
POLICIES = {
    # The generation policy's defaults: 16 sequences (a batch running, one waiting:
    # short ones leave fast) or 8 x 128 tokens owed (rows full of long work).
    "generation": {"policy": "generation"},
    # Its first defaults: a full batch, or 256 tokens owed per row.
    "generation_8_2048": {"policy": "generation", "target_sequences": ROWS, "target_token_backlog": ROWS * 256},
    # Serve's default policy at the two targets a user would pick: a full batch, or a
    # batch running and as many waiting.
    "ongoing_requests_8": {"policy": "ongoing_requests", "target_ongoing_requests": ROWS},
    "ongoing_requests_16": {"policy": "ongoing_requests", "target_ongoing_requests": 2 * ROWS},
}
TIMING = {"metrics_interval_s": 1, "look_back_period_s": 4, "upscale_delay_s": 2, "downscale_delay_s": 10}


def bursty_mixed_load(seed: int = 0) -> list[tuple[float, dict, str]]:
    """(offset s, request body, "short" | "long"), Poisson arrivals per phase."""
    rng = random.Random(seed)
    schedule = []
    for start, end, *rates in PHASES:
        for kind, rate, tokens in (("short", rates[0], SHORT), ("long", rates[1], LONG)):
            offset = start
            while rate and (offset := offset + rng.expovariate(rate)) < end:
                prompt = f"Request {len(schedule)}: write about the sea."
                schedule.append((offset, {"prompt": prompt, "max_new_tokens": tokens}, kind))
    return sorted(schedule, key=lambda item: item[0])


def serve_config(policy: str, port: int) -> dict:
    config = load_serve_config(port=port, name=MODEL, source=fake_source(step_s=STEP_S, rows=ROWS), engine=FAKE_ENGINE)
    model = config["applications"][0]["args"]["models"][0]
    model.update(max_batch_size=ROWS, max_ongoing_requests=2 * ROWS, max_queued_requests=2 * ROWS)
    model["autoscaling"] = {"min_replicas": 1, "max_replicas": 2, **TIMING, **POLICIES[policy]}
    return config


def effective_autoscaling(policy: str) -> dict:
    """The autoscaling_config Serve gets for ``policy`` (targets left unset resolved)."""
    model = serve_config(policy, port=0)["applications"][0]["args"]["models"][0]
    return AutoscalingArgs(**model["autoscaling"]).to_serve_config(model["max_batch_size"])


def replica_seconds(timeline: Timeline, start: float, end: float) -> float:
    events = [(t, c) for t, kind, c in timeline.events if kind == "running_replicas"]
    total, count, at = 0.0, 0, start
    for t, c in events:
        if t <= start:
            count = c
            continue
        if t >= end:
            break
        total += count * (t - at)
        at, count = t, c
    return round(total + count * (end - at), 1)


def run(policy: str, schedule: list[tuple[float, dict, str]]) -> dict:
    port = free_port()
    with SimulatedCluster(max_gpu_workers=2) as cluster, Timeline(cluster, APP, DEPLOYMENT) as timeline:
        cluster.deploy(serve_config(policy, port))
        cluster.wait_for(lambda: cluster.app_status(APP) == "RUNNING", 300, "the application")
        url = f"http://127.0.0.1:{port}"
        began_wall, began = time.time(), timeline.now()
        outcomes = asyncio.run(open_loop(url, [(offset, body) for offset, body, _ in schedule]))
        ended = timeline.now()
        firsts = sorted(cluster.first_tokens(APP, DEPLOYMENT).values())
        # Idle: wait for the second replica and its node to go.
        if timeline.latest("running_replicas") > 1 or timeline.latest("gpu_nodes") > 1:
            cluster.wait_for(lambda: timeline.latest("gpu_nodes") == 1 and timeline.latest("running_replicas") == 1,
                             180, "the scale-down")

    def since_start(kind: str, count: int, after: float = 0.0) -> float | None:
        moment = timeline.first_time(kind, count, after=began + after)
        return None if moment is None else round(moment - began, 1)

    def replicas_during(phase: tuple) -> int:
        start, end = began + phase[0], began + phase[1]
        before = [c for t, kind, c in timeline.events if kind == "running_replicas" and t <= start]
        within = [c for t, kind, c in timeline.events if kind == "running_replicas" and start < t < end]
        return max(before[-1:] + within)

    def sent_in(phase: tuple, kind: str) -> dict:
        return summarize([o for o, (_, _, k) in zip(outcomes, schedule, strict=True)
                          if k == kind and phase[0] <= o.sent_at < phase[1]])

    calm = PHASES[1][1]  # the load falls here; the second replica may go in the quiet phase
    return {
        "policy": policy,
        "second_gpu_node_s": since_start("gpu_nodes", 2),
        "second_replica_running_s": since_start("running_replicas", 2),
        "second_replica_first_token_s": round(firsts[1] - began_wall, 1) if len(firsts) > 1 else None,
        "max_replicas_short_flood": replicas_during(PHASES[0]),
        "max_replicas_long_burst": replicas_during(PHASES[1]),
        "replica_seconds": replica_seconds(timeline, began, ended),
        "second_replica_gone_s": since_start("running_replicas", 1, after=calm),
        "second_node_gone_s": since_start("gpu_nodes", 1, after=calm),
        "all": summarize(outcomes),
        "short_flood": sent_in(PHASES[0], "short"),
        "long_burst_long": sent_in(PHASES[1], "long"),
        "long_burst_short": sent_in(PHASES[1], "short"),
        "load_s": round(ended - began, 1),
        "timeline": [(round(t - began, 1), kind, count) for t, kind, count in timeline.events],
        # (sent at s, latency s, status or None, short | long), request by request.
        "requests": [(round(o.sent_at, 2), round(o.latency_s, 2), o.status, kind)
                     for o, (_, _, kind) in zip(outcomes, schedule, strict=True)],
    }


def median_of(runs: list[dict], path: tuple[str, ...]) -> float | None:
    values = []
    for result in runs:
        value = result
        for key in path:
            value = value[key]
        if value is not None:
            values.append(value)
    return round(statistics.median(values), 2) if values else None


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="runs per policy, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "autoscaling.json")
    args = parser.parse_args()
    schedule = bursty_mixed_load(args.seed)
    print(f"{len(schedule)} requests: {sum(k == 'short' for *_, k in schedule)} short, "
          f"{sum(k == 'long' for *_, k in schedule)} long", flush=True)
    runs = []
    for round_index in range(args.rounds):
        for policy in POLICIES:
            result = run(policy, schedule)
            runs.append(result)
            print(f"round {round_index + 1} {policy}: " + json.dumps({k: v for k, v in result.items() if k != "timeline"}),
                  flush=True)
    summary = {}
    for policy in POLICIES:
        mine = [r for r in runs if r["policy"] == policy]
        summary[policy] = {
            key: median_of(mine, path)
            for key, path in {
                "second_replica_first_token_s": ("second_replica_first_token_s",),
                "second_gpu_node_s": ("second_gpu_node_s",),
                "max_replicas_short_flood": ("max_replicas_short_flood",),
                "status_503": ("all", "status_503"),
                "short_flood_p99_s": ("short_flood", "p99_s"),
                "long_burst_long_p99_s": ("long_burst_long", "p99_s"),
                "long_burst_short_p99_s": ("long_burst_short", "p99_s"),
                "replica_seconds": ("replica_seconds",),
                "second_replica_gone_s": ("second_replica_gone_s",),
                "second_node_gone_s": ("second_node_gone_s",),
            }.items()
        }
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "bench.autoscaling", *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "engine": {"fake_engine_rows": ROWS, "step_s": STEP_S},
        "load": {"phases": PHASES, "short_tokens": SHORT, "long_tokens": LONG, "seed": args.seed,
                 "requests": len(schedule)},
        # What Serve got for each configuration, defaults resolved.
        "policies": {name: effective_autoscaling(name) for name in POLICIES},
        "timing": TIMING,
        "summary_medians": summary,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(to_json(report))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
