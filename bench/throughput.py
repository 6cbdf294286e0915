"""Throughput and latency of the service beside its two references, in one run.

    make bench        # or: .venv/bin/python bench/throughput.py --concurrency 1 4 16 32

Three systems serve the same model and the same mix of requests, one after another on
this machine (never at the same time):

1. ours: the Serve application from configs/serve.yaml (rate limits off), over HTTP;
2. seed: the seed's design, one FastAPI process with one `generate` per request
   (bench/seed_baseline.py), over HTTP;
3. limit: our engine in-process, no serving stack, called directly at the same load.

N closed-loop clients send realistic mixed requests (prompts of a few to a few hundred
words, 8 to 128 new tokens, half greedy, half sampled). Reported per system and
concurrency: completion tokens/s, requests/s, latency p50/p95/p99, TTFT (ours and limit
stream), and the ratios ours/seed and ours/limit; a 32-token latency probe at one
client (ours and limit taking turns request by request), and the p99/p50 of short
requests under load. Writes a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import httpx  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import free_port, percentile  # noqa: E402

WORDS = (
    "the river city light morning people work time story water house world music garden "
    "system market school history winter road friend language science evening mountain"
).split()
SHORT_MAX_NEW_TOKENS = 16
PROBE = {"prompt": "The capital of France is", "max_new_tokens": 32, "temperature": 0}


def request_mix(count: int, seed: int = 0) -> list[dict]:
    """Deterministic mixed requests: prompt length, output length, greedy or sampled."""
    rng = random.Random(seed)
    mix = []
    for number in range(count):
        words = rng.choice([rng.randint(4, 20)] * 3 + [rng.randint(100, 300)])
        body = {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(words)),
            "max_new_tokens": rng.choice([8, 16, 32, 64, 128]),
        }
        if number % 2:
            body.update(temperature=0.8, top_p=0.95, seed=number)
        else:
            body.update(temperature=0)
        mix.append(body)
    return mix


@dataclasses.dataclass
class Sample:
    latency_ms: float
    ttft_ms: float | None
    completion_tokens: int
    max_new_tokens: int
    refusals: int = 0  # 503s waited out before the answer (the service was full)


def summarize(samples: list[Sample], seconds: float) -> dict:
    latencies = [s.latency_ms for s in samples]
    ttfts = [s.ttft_ms for s in samples if s.ttft_ms is not None]
    short = [s.latency_ms for s in samples if s.max_new_tokens <= SHORT_MAX_NEW_TOKENS]
    row = {
        "requests": len(samples),
        "refusals": sum(s.refusals for s in samples),
        "tokens_per_s": sum(s.completion_tokens for s in samples) / seconds,
        "requests_per_s": len(samples) / seconds,
        "p50_ms": statistics.median(latencies),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "ttft_p50_ms": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_ms": percentile(ttfts, 0.99) if ttfts else None,
    }
    if short:
        row["short_p50_ms"] = statistics.median(short)
        row["short_p99_ms"] = percentile(short, 0.99)
    return row


async def closed_loop(send, mix: list[dict], concurrency: int, warmup_s: float, seconds: float, progress: tqdm) -> list[Sample]:
    """``concurrency`` clients send requests from ``mix`` back to back; counted are the
    requests that finish inside the measurement window, which opens after ``warmup_s``
    of the same uninterrupted load (so it sees the steady state, not a cold start) and
    lasts ``seconds``. Requests still running when it closes are finished, not counted."""
    samples: list[Sample] = []
    started = time.monotonic()
    window_opens, window_closes = started + warmup_s, started + warmup_s + seconds

    async def client(number: int) -> None:
        turn = number
        while time.monotonic() < window_closes:
            body = mix[turn % len(mix)]
            turn += concurrency
            sample = await send(body)
            if window_opens <= time.monotonic() <= window_closes:
                samples.append(sample)
                progress.update(1)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return samples


def http_sender(client: httpx.AsyncClient, url: str, stream: bool):
    """Sends one request; a 503 (the service is full) is waited out as its Retry-After
    asks and sent again, the wait counting in the latency and as a refusal."""

    async def send(body: dict) -> Sample:
        started = time.perf_counter()
        refusals = 0
        while True:
            if stream:
                sample = await send_streamed(body, started)
            else:
                sample = await send_plain(body, started)
            if isinstance(sample, Sample):
                sample.refusals = refusals
                return sample
            refusals += 1
            await asyncio.sleep(sample)

    async def send_plain(body: dict, started: float) -> Sample | float:
        response = await client.post(f"{url}/generate", json=body)
        if response.status_code == 503:
            return float(response.headers.get("Retry-After", 1))
        response.raise_for_status()
        return Sample(
            (time.perf_counter() - started) * 1000, None,
            response.json()["usage"]["completion_tokens"], body["max_new_tokens"],
        )

    async def send_streamed(body: dict, started: float) -> Sample | float:
        first, tokens = None, 0
        async with client.stream("POST", f"{url}/generate", json={**body, "stream": True}) as response:
            if response.status_code == 503:
                return float(response.headers.get("Retry-After", 1))
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if first is None and event.get("text"):
                    first = time.perf_counter()
                if "usage" in event:
                    tokens = event["usage"]["completion_tokens"]
        done = time.perf_counter()
        return Sample((done - started) * 1000, ((first or done) - started) * 1000, tokens, body["max_new_tokens"])

    return send


def run_http(url: str, stream: bool, args, mix, label: str) -> dict:
    results = {}
    async def measure(concurrency: int, progress: tqdm) -> list[Sample]:
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(timeout=900, limits=limits) as client:
            return await closed_loop(
                http_sender(client, url, stream), mix, concurrency, args.warmup_seconds, args.seconds, progress
            )

    for concurrency in args.concurrency:
        with tqdm(desc=f"{label:>5} x{concurrency:<2}", unit="req", leave=False) as progress:
            samples = asyncio.run(measure(concurrency, progress))
        results[concurrency] = summarize(samples, args.seconds)
    return results


def paired_probe(calls: dict, count: int) -> dict:
    """p50 latency of one 32-token greedy request at a time, the systems taking turns
    request by request (so machine noise hits them alike), plus each system's median
    ratio to the first one over the pairs."""
    names = list(calls)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(count + 3):
        for name in names if turn % 2 else reversed(names):
            started = time.perf_counter()
            calls[name]()
            if turn >= 3:  # warm-up turns
                latencies[name].append((time.perf_counter() - started) * 1000)
    result = {f"{name}_p50_ms": statistics.median(values) for name, values in latencies.items()}
    base = latencies[names[0]]
    for name in names[1:]:
        result[f"{name}_over_{names[0]}"] = statistics.median(
            [mine / theirs for mine, theirs in zip(latencies[name], base, strict=True)]
        )
    return result


def wait_ready(url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} never became ready")


def measure_ours(args, mix, engine) -> dict:
    """The service's load tests; first the latency probe, taking turns with ``engine``
    in this process (idle while the service answers, and the other way round)."""
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.args import AppArgs

    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    app_args = AppArgs.model_validate(config["applications"][0]["args"])
    app_args.rate_limits.enabled = False
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"

    def served() -> None:
        httpx.post(f"{url}/generate", json=PROBE, timeout=600).raise_for_status()

    try:
        probe = paired_probe({"limit": lambda: asyncio.run(engine_once(engine, PROBE)), "ours": served}, args.probe_requests)
        results = run_http(url, True, args, mix, "ours")
        results["probe"] = probe
        return results
    finally:
        serve.shutdown()
        ray.shutdown()


def measure_seed(args, mix) -> dict:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "seed_baseline.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        return run_http(url, False, args, mix, "seed")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def load_engine():
    from deployments.config import ModelConfig
    from deployments.transformers_engine import TransformersEngine

    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    model_args = config["applications"][0]["args"]["models"][0]
    engine = TransformersEngine(
        ModelConfig(source=model_args["source"], max_batch_size=model_args["max_batch_size"]), "cpu"
    )
    engine.load()
    return engine


async def engine_once(engine, body: dict) -> Sample:
    from deployments.protocol import GenerationParams

    started = time.perf_counter()
    params = GenerationParams(
        prompt=body["prompt"], max_new_tokens=body["max_new_tokens"], temperature=body.get("temperature"),
        top_p=body.get("top_p"), seed=body.get("seed"),
    )
    first, tokens = None, 0
    async for deltas in engine.generate(engine.prepare(params)):
        first = first or time.perf_counter()
        tokens = deltas[-1].completion_tokens
    done = time.perf_counter()
    return Sample((done - started) * 1000, (first - started) * 1000, tokens, body["max_new_tokens"])


def measure_limit(args, mix, engine) -> dict:
    """The engine in this process, the same closed loop, no serving stack."""
    results = {}
    for concurrency in args.concurrency:
        with tqdm(desc=f"limit x{concurrency:<2}", unit="req", leave=False) as progress:
            send = lambda body: engine_once(engine, body)  # noqa: E731
            samples = asyncio.run(closed_loop(send, mix, concurrency, args.warmup_seconds, args.seconds, progress))
        results[concurrency] = summarize(samples, args.seconds)
    return results


def report(results: dict, args) -> dict:
    ours, seed, limit = results["ours"], results["seed"], results["limit"]
    print(f"\ncompletion tokens/s and latency, {args.seconds:.0f} s per point, mixed requests (same run)")
    header = f"{'clients':>7} {'system':>6} {'tok/s':>7} {'req/s':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'503s':>5}"
    print(header)
    ratios = {}
    for concurrency in args.concurrency:
        for name, system in (("ours", ours), ("seed", seed), ("limit", limit)):
            row = system[concurrency]
            ttft50 = f"{row['ttft_p50_ms']:9.0f}" if row["ttft_p50_ms"] is not None else f"{'-':>9}"
            ttft99 = f"{row['ttft_p99_ms']:9.0f}" if row["ttft_p99_ms"] is not None else f"{'-':>9}"
            print(
                f"{concurrency:>7} {name:>6} {row['tokens_per_s']:7.1f} {row['requests_per_s']:6.2f}"
                f" {row['p50_ms']:8.0f} {row['p95_ms']:8.0f} {row['p99_ms']:8.0f} {ttft50} {ttft99}"
                f" {row['refusals']:5d}"
            )
        ratios[concurrency] = {
            "ours_over_seed": ours[concurrency]["tokens_per_s"] / seed[concurrency]["tokens_per_s"],
            "ours_over_limit": ours[concurrency]["tokens_per_s"] / limit[concurrency]["tokens_per_s"],
        }
    print(f"\n{'clients':>7} {'ours/seed':>10} {'ours/limit':>11}   (completion tokens/s)")
    for concurrency, ratio in ratios.items():
        print(f"{concurrency:>7} {ratio['ours_over_seed']:10.2f} {ratio['ours_over_limit']:11.2f}")
    probe = ours["probe"]
    probe_ratio = probe["ours_over_limit"]
    print(
        f"\n32-token request, one client, taking turns: ours p50 {probe['ours_p50_ms']:.0f} ms, "
        f"limit p50 {probe['limit_p50_ms']:.0f} ms -> median ours/limit {probe_ratio:.2f}"
    )
    targets = {}
    if 16 in ratios:
        targets["x16_ours_over_seed_ge_8"] = ratios[16]["ours_over_seed"] >= 8
        targets["x16_ours_over_limit_ge_0.85"] = ratios[16]["ours_over_limit"] >= 0.85
    targets["x1_probe_within_10pct"] = probe_ratio <= 1.10
    loaded = max(args.concurrency)
    short = ours[loaded]
    if "short_p50_ms" in short:
        tail = short["short_p99_ms"] / short["short_p50_ms"]
        targets["short_p99_le_2x_p50"] = tail <= 2
        print(
            f"short requests (<= {SHORT_MAX_NEW_TOKENS} new tokens) at {loaded} clients: "
            f"p50 {short['short_p50_ms']:.0f} ms, p99 {short['short_p99_ms']:.0f} ms -> p99/p50 {tail:.2f}"
        )
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in targets.items()))
    return {"ratios": ratios, "probe_ours_over_limit": probe_ratio, "targets": targets}


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("ours", "seed", "limit"):
        xs = args.concurrency
        throughput.plot(xs, [results[name][c]["tokens_per_s"] for c in xs], marker="o", label=name)
        tail.plot(xs, [results[name][c]["p99_ms"] / 1000 for c in xs], marker="o", label=name)
    for axis, title, unit in ((throughput, "completion tokens/s", "tokens/s"), (tail, "p99 latency", "s")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(args.concurrency, [str(c) for c in args.concurrency])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("ray-textgen vs the seed design vs the in-process engine (same machine, same run)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup-seconds", type=float, default=20)
    parser.add_argument("--probe-requests", type=int, default=20)
    parser.add_argument("--systems", nargs="+", default=["ours", "seed", "limit"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    mix = request_mix(512)
    engine = load_engine()
    results = {}
    if "ours" in args.systems:
        results["ours"] = measure_ours(args, mix, engine)
    if "limit" in args.systems:  # with the cluster gone, so it has the machine to itself
        results["limit"] = measure_limit(args, mix, engine)
    engine.close()  # a scheduler thread still running at interpreter exit aborts it
    if "seed" in args.systems:
        results["seed"] = measure_seed(args, mix)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = report(results, args) if set(results) == {"ours", "seed", "limit"} else {}
    (args.out / "throughput.json").write_text(
        json.dumps({"results": results, "summary": summary, "args": vars(args)}, default=str, indent=2)
    )
    if set(results) == {"ours", "seed", "limit"}:
        plot(results, args, args.out / "throughput.png")
        print(f"wrote {args.out / 'throughput.json'} and {args.out / 'throughput.png'}")


if __name__ == "__main__":
    main()
