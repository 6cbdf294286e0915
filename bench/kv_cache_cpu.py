"""The engine's two KV caches on this machine's CPU, in-process, interleaved:

- dynamic: transformers' DynamicCache, rows left-padded and joined (the CPU default);
- slots: the GPU's slot cache run eagerly (no CUDA graphs on a CPU).

    python bench/kv_cache_cpu.py [--clients 1 16] [--rounds 3]

Same model (the embedded SmolLM2-135M), dtype (`auto`: float32 without AMX), threads
and load for both; each round measures every configuration once, in turn, so drift of
the machine hits both. Decides `kv_cache: auto` on a CPU. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, write_record  # noqa: E402
from bench.gpu_throughput import ours  # noqa: E402
from deployments.config import ModelConfig  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/kv_cache_cpu.json"))
    args = parser.parse_args()
    engines = {}
    for kv_cache in ("dynamic", "slots"):
        engines[kv_cache] = TransformersEngine(ModelConfig(kv_cache=kv_cache, max_batch_size=max(args.clients)), "cpu")
        engines[kv_cache].load()
    record = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "embedded SmolLM2-135M-Instruct", "dtype": engines["dynamic"].status().dtype,
        "new_tokens": args.new_tokens, "seconds": args.seconds, "greedy": True, "rounds": [],
    }
    for round_number in range(args.rounds):
        for clients in args.clients:
            for kv_cache, engine in engines.items():
                result = ours(engine, clients, args.seconds, args.new_tokens)
                record["rounds"].append({"round": round_number, "clients": clients, "kv_cache": kv_cache, **result})
                print(f"round {round_number} clients {clients:>2} {kv_cache:>7}: {result['tokens_per_s']:.1f} tok/s",
                      flush=True)
    summary = {}
    for clients in args.clients:
        rates = {kv: [r["tokens_per_s"] for r in record["rounds"] if r["clients"] == clients and r["kv_cache"] == kv]
                 for kv in engines}
        summary[clients] = {kv: statistics.median(values) for kv, values in rates.items()}
        summary[clients]["slots_over_dynamic"] = round(summary[clients]["slots"] / summary[clients]["dynamic"], 3)
        print(f"clients {clients}: median dynamic {summary[clients]['dynamic']:.1f}, slots "
              f"{summary[clients]['slots']:.1f} tok/s, slots/dynamic {summary[clients]['slots_over_dynamic']}")
    record["median_tokens_per_s"] = summary
    write_record(args.out, record)
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
