"""Engine throughput on a GPU: our continuous batching beside the seed's design (one
`generate` per request, concurrent threads) and transformers' own continuous batching
(`generate_batch`, paged attention), on the same model and device, in one run.

    python bench/gpu_throughput.py --config FOLDER    # FOLDER: config.json + tokenizer

The model is the architecture of FOLDER's config.json with random weights (no download
needed; throughput does not depend on the weights' values), in bfloat16.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deployments.config import ModelConfig  # noqa: E402
from deployments.protocol import GenerationParams  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402

PROMPT = "The history of the river city is long and full of stories about people, work and music. " * 2


def build_model(config_folder: Path, folder: Path) -> None:
    config = AutoConfig.from_pretrained(config_folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(config_folder).save_pretrained(folder)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ours(engine: TransformersEngine, concurrency: int, seconds: float, new_tokens: int) -> tuple[float, float]:
    """Completion tokens/s and p50 request latency (ms) of our engine, closed loop."""
    params = GenerationParams(prompt=PROMPT, max_new_tokens=new_tokens, temperature=0)

    async def run(warm_up: bool = False) -> tuple[int, list[float]]:
        deadline = time.monotonic() + (1 if warm_up else seconds)
        tokens, latencies = 0, []

        async def client() -> None:
            nonlocal tokens
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async for deltas in engine.generate(engine.prepare(params)):
                    last = deltas[-1]
                tokens += last.completion_tokens
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return tokens, latencies

    asyncio.run(run(warm_up=True))  # CUDA kernels, allocator
    started = time.perf_counter()
    tokens, latencies = asyncio.run(run())
    return tokens / (time.perf_counter() - started), statistics.median(latencies)



def seed_design(model, tokenizer, concurrency: int, seconds: float, new_tokens: int) -> float:
    inputs = tokenizer(PROMPT, return_tensors="pt").to(DEVICE)

    def one() -> int:
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
        return output.shape[1] - inputs["input_ids"].shape[1]

    one()
    deadline = time.monotonic() + seconds
    started = time.perf_counter()

    def client() -> int:
        total = 0
        while time.monotonic() < deadline:
            total += one()
        return total

    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(lambda _: client(), range(concurrency)))
    return tokens / (time.perf_counter() - started)


def transformers_continuous_batching(model, tokenizer, requests: int, new_tokens: int) -> float | str:
    ids = tokenizer(PROMPT)["input_ids"]
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=tokenizer.eos_token_id)
    try:
        model.set_attn_implementation("paged|sdpa")
        model.generate_batch(inputs=[ids] * 4, generation_config=config)  # warm-up
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=[ids] * requests, generation_config=config)
        elapsed = time.perf_counter() - started
        return sum(len(out.generated_tokens) for out in outputs.values()) / elapsed
    except Exception as exc:  # noqa: BLE001 - report what this transformers lacks
        return f"unavailable: {type(exc).__name__}: {exc}"[:160]
    finally:
        model.set_attn_implementation("sdpa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed-max-concurrency", type=int, default=16)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run only)"
    print(f"device: {name}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        build_model(args.config, Path(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEVICE).eval()
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, bfloat16, "
              f"{args.new_tokens} new tokens per request, greedy")
        engine = TransformersEngine(ModelConfig(source=folder, max_batch_size=max(args.concurrency)), DEVICE)
        engine.load()
        print(f"{'clients':>7} {'ours tok/s':>11} {'ours p50 ms':>12} {'seed tok/s':>11} {'ours/seed':>10}")
        for concurrency in args.concurrency:
            ours_rate, ours_p50 = ours(engine, concurrency, args.seconds, args.new_tokens)
            if concurrency > args.seed_max_concurrency:  # threads of generate: slow, and no better
                print(f"{concurrency:>7} {ours_rate:11.0f} {ours_p50:12.0f} {'-':>11} {'-':>10}")
                continue
            seed_rate = seed_design(model, tokenizer, concurrency, args.seconds, args.new_tokens)
            print(f"{concurrency:>7} {ours_rate:11.0f} {ours_p50:12.0f} {seed_rate:11.0f} {ours_rate / seed_rate:10.1f}")
        largest = max(args.concurrency)
        hf = transformers_continuous_batching(model, tokenizer, largest, args.new_tokens)
        shown = f"{hf:.0f} tok/s" if isinstance(hf, float) else hf
        print(f"transformers generate_batch (paged), {largest} requests at once: {shown}")


if __name__ == "__main__":
    main()
