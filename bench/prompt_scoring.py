"""What prompt scoring costs: prompt tokens/s of 16 concurrent 512-token prompts scored
(echo, prompt log probabilities with 1 alternative, no new token) against the same
prompts prefilled for one new token without scores, in-process on this machine's CPU,
interleaved rounds.

    python bench/prompt_scoring.py [--prompts 16] [--length 512] [--rounds 3]

Same model (the embedded SmolLM2-135M), dtype, threads and prompts for both loads.
Scoring keeps every position's logits, in chunks of 512 positions, and a log-softmax
over the vocabulary for each; plain prefill keeps the last position's. Writes JSON to
--out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_rounds, machine, write_record  # noqa: E402
from deployments.config import ModelConfig  # noqa: E402
from deployments.protocol import GenerationParams, TokenizeParams  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402

TEXT = (
    "The history of the city goes back two thousand years, to a settlement on an island in the river. "
    "Its bridges, markets and schools grew with the trade that passed through it, and each century left "
    "its buildings, its songs and its arguments. "
)


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
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prompt_scoring.json"))
    args = parser.parse_args()
    engine = TransformersEngine(ModelConfig(max_batch_size=args.prompts), "cpu")
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
        "model": "embedded SmolLM2-135M-Instruct", "dtype": engine.status().dtype, "prompts": args.prompts,
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
    write_record(args.out, record)
    engine.close()


if __name__ == "__main__":
    main()
