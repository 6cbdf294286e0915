"""A/B of two checkouts of this service on this machine: `serve run configs/serve.yaml`
from each, taking turns round after round, the same closed-loop load on each.

    python bench/ab.py --base 4155e08 [--head HEAD] [--clients 1 16] [--rounds 3]

Each ref is checked out into a git worktree under /tmp and served with this checkout's
virtual environment (its code first on PYTHONPATH, so the replicas import it), one
service at a time, never both. ``--head`` defaults to this working tree as it is,
uncommitted changes included. The load: N clients sending /generate back to back, one
prompt each from a fixed mix, 64 sampled new tokens (temperature 0.8, seeded); counted
are the completion tokens of requests finishing inside the window after a warm-up.
Writes JSON (machine, refs, every run, medians, head/base ratios) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import machine, write_record  # noqa: E402
from bench.service import Service  # noqa: E402
from bench.throughput import WORDS  # noqa: E402


def checkout(ref: str, folder: Path) -> Path:
    """``ref`` as a worktree in ``folder`` (detached, so no branch is touched)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(folder), ref],
                   check=True, capture_output=True)
    return folder


def commit_of(ref: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", ref], check=True, capture_output=True,
                          text=True).stdout.strip()


def prompts(count: int) -> list[str]:
    return [" ".join(WORDS[(number * 7 + i) % len(WORDS)] for i in range(12 + number % 24)) for number in range(count)]


async def load(url: str, clients: int, warmup_s: float, seconds: float, new_tokens: int) -> dict:
    mix = prompts(64)
    started = time.monotonic()
    opens, closes = started + warmup_s, started + warmup_s + seconds
    tokens, requests = 0, 0

    async def client(number: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, requests
        turn = number
        while time.monotonic() < closes:
            body = {"prompt": mix[turn % len(mix)], "max_new_tokens": new_tokens, "temperature": 0.8, "seed": turn}
            turn += clients
            response = await http.post(f"{url}/generate", json=body)
            response.raise_for_status()
            if opens <= time.monotonic() <= closes:
                tokens += response.json()["usage"]["completion_tokens"]
                requests += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        await asyncio.gather(*(client(number, http) for number in range(clients)))
    return {"tokens_per_s": round(tokens / seconds, 2), "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git ref to compare against")
    parser.add_argument("--head", default=None, help="a git ref; default: this working tree as it is")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--warmup-seconds", type=float, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/ab.json"))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="ab-checkouts-", dir="/tmp"))
    sources = {"base": checkout(args.base, scratch / "base")}
    sources["head"] = checkout(args.head, scratch / "head") if args.head else ROOT
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True,
                                text=True).stdout.strip()) and not args.head
    record = {
        "machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base": {"ref": args.base, "commit": commit_of(args.base)},
        "head": {"ref": args.head or "working tree", "commit": commit_of(args.head or "HEAD"), "uncommitted": dirty},
        "config": "configs/serve.yaml of each", "endpoint": "/generate", "new_tokens": args.new_tokens,
        "temperature": 0.8, "seconds": args.seconds, "warmup_seconds": args.warmup_seconds, "runs": [],
    }
    try:
        for round_number in range(args.rounds):
            # Alternate which goes first, so that neither always follows the other.
            order = ["base", "head"] if round_number % 2 == 0 else ["head", "base"]
            for name in order:
                with Service(sources[name], scratch / f"{name}.log") as service:
                    for clients in args.clients:
                        result = asyncio.run(load(service.url, clients, args.warmup_seconds, args.seconds, args.new_tokens))
                        record["runs"].append({"round": round_number, "checkout": name, "clients": clients, **result})
                        print(f"round {round_number} {name} x{clients}: {result['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        for name in ("base", "head"):
            if sources[name] != ROOT:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(sources[name])],
                               capture_output=True)
    medians = {
        f"{name}_x{clients}": statistics.median(
            r["tokens_per_s"] for r in record["runs"] if r["checkout"] == name and r["clients"] == clients
        )
        for name in ("base", "head") for clients in args.clients
    }
    record["median_tokens_per_s"] = medians
    record["head_over_base"] = {
        f"x{clients}": round(medians[f"head_x{clients}"] / medians[f"base_x{clients}"], 3) for clients in args.clients
    }
    print(json.dumps({"median_tokens_per_s": medians, "head_over_base": record["head_over_base"]}, indent=1))
    write_record(args.out, record)


if __name__ == "__main__":
    main()
