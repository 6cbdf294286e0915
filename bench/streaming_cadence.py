"""Streaming cadence: what a streaming client sees between two chunks, against the
engine's own time per token, with the hand-over timer of 2026-12-03
(`stream_interval_s: 0.25`) and with adaptive hand-overs (`stream_interval_s: 0`: each
step's tokens go as they are made; only what piles up while the previous hand-over is
still unread is merged).

    python bench/streaming_cadence.py [--rounds 2] [--clients 1 16]

Each setting runs `serve run configs/serve.yaml` (the embedded model, its dtype and
threads, rate limits off) with only `stream_interval_s` changed, in interleaved rounds.
Clients stream POST /v1/completions back to back, `ignore_eos` and 64 tokens, with
`stream_options.continuous_usage_stats`, so every chunk says how many tokens the stream
has. Per chunk: the gap since the previous chunk (inter-token latency as serving
benchmarks count it). Per stream: its time per token after the first, (last - first
chunk) / (tokens - 1), i.e. the engine's step time as that stream saw it. Writes JSON
to --out after every measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import free_port, machine, percentile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVE = Path(sys.executable).parent / "serve"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "The three most important things about software engineering are", "Water boils at"]


def start_service(interval_s: float, folder: Path) -> tuple[subprocess.Popen, str, Path]:
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["models"][0]["stream_interval_s"] = interval_s
    path = folder / f"serve-{interval_s}.yaml"
    path.write_text(yaml.safe_dump(config))
    ray_temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    log = open(folder / f"serve-{interval_s}.log", "wb")
    process = subprocess.Popen(
        [str(SERVE), "run", str(path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": str(ray_temp), "TEXTGEN_RATE_LIMIT": "off"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, url, ray_temp
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("serve run did not become ready")


def stop_service(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def stream_once(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> list[tuple[float, int]]:
    """(arrival, tokens so far) of every chunk that carries text."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    for _ in range(30):  # just after start, Serve's router may not know the replica yet: 503, retry
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code == 503:
                await asyncio.sleep(1)
                continue
            response.raise_for_status()
            return await read_chunks(response)
    raise RuntimeError("the service kept answering 503")


async def read_chunks(response: httpx.Response) -> list[tuple[float, int]]:
    chunks = []
    async for line in response.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if chunk["choices"] and chunk["choices"][0]["text"]:
            chunks.append((time.perf_counter(), chunk["usage"]["completion_tokens"]))
    return chunks


async def drive(url: str, clients: int, seconds: float, tokens: int) -> dict:
    deadline = time.monotonic() + seconds
    streams: list[list[tuple[float, int]]] = []

    async def client_loop(number: int) -> None:
        turn = number
        async with httpx.AsyncClient(timeout=300) as client:
            while time.monotonic() < deadline:
                streams.append(await stream_once(client, url, PROMPTS[turn % len(PROMPTS)], tokens))
                turn += 1

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    gaps = [later[0] - earlier[0] for chunks in streams for earlier, later in itertools.pairwise(chunks)]
    per_token = [(chunks[-1][0] - chunks[0][0]) / (chunks[-1][1] - chunks[0][1])
                 for chunks in streams if len(chunks) > 1 and chunks[-1][1] > chunks[0][1]]
    step = statistics.median(per_token)
    return {
        "streams": len(streams),
        "tokens_per_s": sum(chunks[-1][1] for chunks in streams if chunks) / elapsed,
        "chunk_gap_p50_ms": statistics.median(gaps) * 1000, "chunk_gap_p99_ms": percentile(gaps, 0.99) * 1000,
        "time_per_token_ms": step * 1000,
        "tokens_per_chunk": statistics.mean(
            (later[1] - earlier[1]) for chunks in streams for earlier, later in itertools.pairwise(chunks)
        ),
        "gap_p50_over_time_per_token": statistics.median(gaps) / step,
        "gap_p99_over_time_per_token": percentile(gaps, 0.99) / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=25)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/streaming_cadence.json"))
    args = parser.parse_args()
    settings = {"timer_0.25s": 0.25, "adaptive": 0.0}
    record = {"machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "model": "embedded SmolLM2-135M-Instruct via serve run configs/serve.yaml", "tokens": args.tokens,
              "seconds": args.seconds, "greedy": True, "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for round_number in range(args.rounds):
            for name, interval_s in settings.items():
                process, url, ray_temp = start_service(interval_s, Path(folder))
                try:
                    asyncio.run(drive(url, max(args.clients), 5, args.tokens))  # warm-up
                    for clients in args.clients:
                        result = asyncio.run(drive(url, clients, args.seconds, args.tokens))
                        record["runs"].append({"round": round_number, "setting": name, "clients": clients, **result})
                        print(f"round {round_number} {name:>12} {clients:>3} clients: "
                              + ", ".join(f"{key} {value:.2f}" for key, value in result.items()), flush=True)
                        args.out.write_text(json.dumps(record, indent=1) + "\n")
                finally:
                    stop_service(process)
                    subprocess.run(["rm", "-rf", str(ray_temp)], check=False)
    summary = {}
    for name in settings:
        for clients in args.clients:
            runs = [r for r in record["runs"] if r["setting"] == name and r["clients"] == clients]
            summary[f"{name}/{clients}"] = {key: statistics.median(r[key] for r in runs)
                                            for key in runs[0] if key not in ("round", "setting", "clients")}
    for clients in args.clients:
        summary[f"tokens_per_s_adaptive_over_timer/{clients}"] = (
            summary[f"adaptive/{clients}"]["tokens_per_s"] / summary[f"timer_0.25s/{clients}"]["tokens_per_s"]
        )
    record["summary"] = summary
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
