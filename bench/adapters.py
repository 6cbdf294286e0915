"""What serving LoRA adapters costs: tokens/s of 16 clients spread over 4 adapters (rows
of every adapter in one batch) against 16 clients of the base model on an engine with no
adapters, in-process on this machine's CPU, interleaved.

    python bench/adapters.py [--clients 16] [--adapters 4] [--rounds 3]

Same model (the embedded SmolLM2-135M), dtype, threads, prompt and greedy decoding for
both; the adapters are random LoRAs of rank 8 on every attention and MLP projection
(made with PEFT, as a fine-tune would be saved). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, write_record  # noqa: E402
from bench.gpu_throughput import PROMPT, ours  # noqa: E402
from deployments.config import ModelConfig  # noqa: E402
from deployments.model_source import embedded_model_folder  # noqa: E402
from deployments.protocol import GenerationParams  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(count: int, folder: Path) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = {}
    for index in range(count):
        torch.manual_seed(index)
        model = AutoModelForCausalLM.from_pretrained(embedded_model_folder(), dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(folder / f"adapter{index}")
        adapters[f"adapter{index}"] = str(folder / f"adapter{index}")
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapters.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:  # adapters load from it on first use
        measure(args, make_adapters(args.adapters, Path(folder)))


def measure(args: argparse.Namespace, adapters: dict[str, str]) -> None:
    base = TransformersEngine(ModelConfig(max_batch_size=args.clients), "cpu")
    served = TransformersEngine(
        ModelConfig(max_batch_size=args.clients, adapters=adapters, max_adapters=args.adapters), "cpu"
    )
    base.load()
    served.load()

    def params(adapter: str | None) -> GenerationParams:
        return GenerationParams(prompt=PROMPT, max_new_tokens=args.new_tokens, temperature=0, adapter=adapter)

    names = list(adapters)
    loads = {
        "base model, no adapters": (base, [params(None)] * args.clients),
        f"{args.adapters} adapters": (served, [params(names[i % len(names)]) for i in range(args.clients)]),
    }
    record = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "embedded SmolLM2-135M-Instruct", "dtype": base.status().dtype, "clients": args.clients,
        "adapters": args.adapters, "rank": 8, "target_modules": TARGETS, "new_tokens": args.new_tokens,
        "seconds": args.seconds, "greedy": True, "rounds": [],
    }
    for round_number in range(args.rounds):
        for name, (engine, requests) in loads.items():
            result = ours(engine, args.clients, args.seconds, args.new_tokens, requests)
            record["rounds"].append({"round": round_number, "load": name, **result})
            print(f"round {round_number} {name:>24}: {result['tokens_per_s']:.1f} tok/s", flush=True)
    medians = {name: statistics.median(r["tokens_per_s"] for r in record["rounds"] if r["load"] == name)
               for name in loads}
    record["median_tokens_per_s"] = medians
    base_rate, adapter_rate = medians.values()
    record["adapters_over_base"] = round(adapter_rate / base_rate, 3)
    # Each round's two loads ran back to back: their ratio sees the same machine.
    per_round = [
        adapted["tokens_per_s"] / plain["tokens_per_s"]
        for plain, adapted in zip(record["rounds"][0::2], record["rounds"][1::2], strict=True)
    ]
    record["median_round_ratio"] = round(statistics.median(per_round), 3)
    print(f"medians {medians}, adapters/base {record['adapters_over_base']}, "
          f"median of the rounds' ratios {record['median_round_ratio']}")
    write_record(args.out, record)
    base.close()
    served.close()


if __name__ == "__main__":
    main()
