"""What structured outputs cost: tokens/s of the same load with and without a JSON
schema, in-process on this machine's CPU, interleaved, and each schema's compile time.

    python bench/structured_outputs.py [--clients 16] [--rounds 3]

Same model (the embedded SmolLM2-135M), dtype, threads, prompt and greedy decoding for
both loads. Every request asks for --new-tokens tokens under a schema whose shortest
valid text is longer than that (an array of at least 50 objects), so constrained rows
generate exactly as many tokens as free ones: the difference is the cost of the masks
(llguidance fills a bitmask per constrained row and token; the logits are masked),
nothing else. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_rounds, machine, write_record  # noqa: E402
from bench.gpu_throughput import ours  # noqa: E402
from deployments.config import ModelConfig  # noqa: E402
from deployments.protocol import ChatMessage, GenerationParams, OutputConstraint  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402
from deployments.transformers_engine.grammars import Grammars  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
LOAD_SCHEMA = {"type": "array", "items": PERSON, "minItems": 50}
# Compile times are reported for these too (cold: a fresh compiler each).
COMPILED = {
    "people (the load's)": LOAD_SCHEMA,
    "flat": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
             "required": ["a", "b"]},
    "any JSON object": {"type": "object"},
}
MESSAGES = (ChatMessage("user", "List fifty people as JSON: name, age, role and address."),)


def compile_times(engine: TransformersEngine) -> dict:
    grammars = Grammars(engine._tokenizer, engine._vocab_size, engine._eos_token_ids)
    times = {}
    for name, schema in COMPILED.items():
        constraint = OutputConstraint("json_schema", json.dumps(schema), "json_schema")
        started = time.perf_counter()
        grammars.check(constraint)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        grammars.matcher(constraint)
        times[name] = {"compile_ms": round(cold * 1000, 2), "cached_matcher_ms": round((time.perf_counter() - started) * 1000, 3)}
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/structured_outputs.json"))
    args = parser.parse_args()
    engine = TransformersEngine(ModelConfig(max_batch_size=args.clients), "cpu")
    engine.load()
    constraint = OutputConstraint("json_schema", json.dumps(LOAD_SCHEMA), "json_schema")
    loads = {
        "free": GenerationParams(messages=MESSAGES, max_new_tokens=args.new_tokens, temperature=0),
        "json_schema": GenerationParams(messages=MESSAGES, max_new_tokens=args.new_tokens, temperature=0,
                                        constraint=constraint),
    }
    record = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "embedded SmolLM2-135M-Instruct", "dtype": engine.status().dtype, "clients": args.clients,
        "new_tokens": args.new_tokens, "seconds": args.seconds, "greedy": True,
        "compile": compile_times(engine), "rounds": [],
    }
    print(json.dumps(record["compile"], indent=1), flush=True)
    record["rounds"], medians = interleaved_rounds(
        loads, args.rounds, lambda params: ours(engine, args.clients, args.seconds, args.new_tokens, [params]),
        "tokens_per_s",
    )
    record["median_tokens_per_s"] = medians
    record["constrained_over_free"] = round(medians["json_schema"] / medians["free"], 3)
    print(f"median free {medians['free']:.1f}, json_schema {medians['json_schema']:.1f} tok/s, "
          f"ratio {record['constrained_over_free']}")
    write_record(args.out, record)
    engine.close()


if __name__ == "__main__":
    main()
