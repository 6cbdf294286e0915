"""Helpers shared by the benchmarks."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path


def interleaved_rounds(
    loads: Mapping[str, object], rounds: int, measure: Callable[[object], dict], metric: str
) -> tuple[list[dict], dict[str, float]]:
    """``measure(load)`` for each load in turn, ``rounds`` times over (so that a drifting
    machine affects every load alike); returns every result with its round and load,
    and each load's median of ``metric``. Prints each result as it comes."""
    results = []
    for round_number in range(rounds):
        for name, load in loads.items():
            result = measure(load)
            results.append({"round": round_number, "load": name, **result})
            print(f"round {round_number} {name:>24}: {metric} {result[metric]:.1f}", flush=True)
    medians = {name: statistics.median(r[metric] for r in results if r["load"] == name) for name in loads}
    return results, medians


def write_record(path: Path, record: dict) -> None:
    """Writes a benchmark's record as indented JSON, making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (``fraction`` in [0, 1])."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def machine() -> dict:
    """What a result was measured on: the CPU (model, cores, the flags that decide the
    dtype and the matmul kernels) and the versions that matter."""
    cpuinfo = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        cpuinfo.setdefault(key.strip(), value.strip())  # the first CPU's
    flags = cpuinfo.get("flags", "").split()
    versions = {}
    for package in ("torch", "transformers", "ray"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpuinfo.get("model name", platform.processor()), "cores": len(os.sched_getaffinity(0)),
            "amx": "amx_tile" in flags, "avx512": "avx512f" in flags, "python": platform.python_version(),
            **versions}
