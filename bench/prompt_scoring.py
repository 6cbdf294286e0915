"""What prompt scoring costs: prompt tokens/s of 16 concurrent 512-token prompts scored
(echo, prompt log probabilities with 1 alternative, no new token) against the same
prompts prefilled for one new token without scores, in-process on this machine's CPU,
interleaved rounds.

    python bench/prompt_scoring.py [--size 135m|360m] [--prompts 16] [--length 512] [--rounds 3]

Same model, dtype, threads and prompts for both loads: the embedded SmolLM2-135M, or
(``--size 360m``) SmolLM2-360M's shape with random weights built from the embedded
model's config (no weights can be downloaded here; speed does not depend on their
values). Scoring applies the output layer to every position, 512 at a time, with a
logsumexp over the vocabulary for each; plain prefill applies it to the last position.
The ratio is bounded by the output layer's share of a token's work: 49152 x 576
multiply-adds against about 115 M in the 135M model's backbone and attention over 512
tokens (so 0.80 at best), 49152 x 960 against about 330 M in the 360M's (0.87).
Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_rounds, machine, write_record  # noqa: E402
from deployments.config import ModelConfig  # noqa: E402
from deployments.model_source import embedded_model_folder  # noqa: E402
from deployments.protocol import GenerationParams, TokenizeParams  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402

TEXT = (
    "The history of the city goes back two thousand years, to a settlement on an island in the river. "
    "Its bridges, markets and schools grew with the trade that passed through it, and each century left "
    "its buildings, its songs and its arguments. "
)


# Config overrides of each size: SmolLM2-360M's published shape.
SIZES = {
    "135m": None,
    "360m": {"hidden_size": 960, "num_hidden_layers": 32, "intermediate_size": 2560,
             "num_attention_heads": 15, "num_key_value_heads": 5},
}


def built_model(overrides: dict, folder: Path) -> str:
    """A model of the embedded one's config with ``overrides``, random weights, in
    ``folder``."""
    embedded = embedded_model_folder()
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(embedded, **overrides)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded).save_pretrained(folder)
    return str(folder)


def timed(engine: TransformersEngine, requests: list[GenerationParams]) -> float:
    """Seconds for the requests, sent together, to finish."""

    async def one(params: GenerationParams) -> None:
        async for _ in engine.generate(engine.prepare(params)):
            pass

    async def together() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(one(params) for params in requests))
        return time.perf_counter() - started

    return asyncio.run(together())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="default bench/results/prompt_scoring[_SIZE].json")
    args = parser.parse_args()
    out = args.out or Path(f"bench/results/prompt_scoring{'' if args.size == '135m' else '_' + args.size}.json")
    folder = tempfile.TemporaryDirectory()
    source = {} if SIZES[args.size] is None else {"source": built_model(SIZES[args.size], Path(folder.name))}
    # No prefix cache: the rounds repeat the same prompts, which plain prefill would then
    # take from the cache (scoring never does: it needs every position's logits).
    engine = TransformersEngine(ModelConfig(max_batch_size=args.prompts, prefix_cache_mb=0, **source), "cpu")
    engine.load()
    words = engine.tokenize(TokenizeParams(prompt=TEXT * 40, add_special_tokens=False))
    prompts = [tuple(words[offset: offset + args.length]) for offset in range(args.prompts)]  # all distinct
    loads = {
        "prefill_one_token": [GenerationParams(prompt_token_ids=ids, max_new_tokens=1, temperature=0) for ids in prompts],
        "scored": [GenerationParams(prompt_token_ids=ids, echo=True, prompt_logprobs=1, max_new_tokens=0)
                   for ids in prompts],
    }
    record = {
        "machine": machine(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "embedded SmolLM2-135M-Instruct" if args.size == "135m" else "SmolLM2-360M's shape, random weights",
        "dtype": engine.status().dtype, "prompts": args.prompts,
        "prompt_tokens": args.length, "rounds": [],
    }
    for params in loads.values():  # warm-up
        timed(engine, params)
    def measure(params: list[GenerationParams]) -> dict:
        seconds = timed(engine, params)
        return {"seconds": seconds, "prompt_tokens_per_s": args.prompts * args.length / seconds}

    record["rounds"], medians = interleaved_rounds(loads, args.rounds, measure, "prompt_tokens_per_s")
    record["median_prompt_tokens_per_s"] = medians
    record["scored_over_prefill"] = round(medians["scored"] / medians["prefill_one_token"], 3)
    print(json.dumps({"median_prompt_tokens_per_s": medians, "scored_over_prefill": record["scored_over_prefill"]}))
    write_record(out, record)
    engine.close()
    folder.cleanup()


if __name__ == "__main__":
    main()
