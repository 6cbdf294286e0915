"""What tool calling costs: tokens/s of the same chat load with and without tools,
in-process on this machine's CPU, interleaved rounds.

    python bench/tool_calls.py [--clients 16] [--rounds 3]

Same model (the embedded SmolLM2-135M), dtype, threads, question and greedy decoding
for every load. `tools_required` and `tools_auto` send two tools (their definitions
and instructions add about 300 prompt tokens, which the fallback renders for this
model) and generate under the tool-call grammar; `no_tools` sends the question alone;
`tools_prompt_no_grammar` sends the very prompt tokens of the tools loads as a plain
prompt, free: it separates what the longer prompt costs from what the grammar costs.
Tokens/s counts generated tokens over the whole time, prefill included: what a client
sees. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_rounds, machine, write_record  # noqa: E402
from bench.gpu_throughput import ours  # noqa: E402
from deployments.config import ModelConfig  # noqa: E402
from deployments.protocol import ChatMessage, GenerationParams, ToolSpec, ToolUse  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402

TOOLS = (
    ToolSpec("get_weather", "Current weather in a city.", json.dumps({
        "type": "object", "required": ["city", "unit"],
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    })),
    ToolSpec("get_time", "Current time in a timezone.", json.dumps({
        "type": "object", "required": ["timezone"], "properties": {"timezone": {"type": "string"}},
    })),
)
MESSAGES = (ChatMessage("user", "What are the weather and the time in Paris today?"),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tool_calls.json"))
    args = parser.parse_args()
    engine = TransformersEngine(ModelConfig(max_batch_size=args.clients), "cpu")
    engine.load()
    loads = {
        name: GenerationParams(messages=MESSAGES, max_new_tokens=args.new_tokens, temperature=0, tool_use=tool_use)
        for name, tool_use in (
            ("no_tools", None), ("tools_required", ToolUse(TOOLS, "required")), ("tools_auto", ToolUse(TOOLS, "auto")),
        )
    }
    rendered = engine.detokenize(engine.prepare(loads["tools_required"]).prompt_token_ids)
    loads["tools_prompt_no_grammar"] = GenerationParams(prompt=rendered, max_new_tokens=args.new_tokens, temperature=0)
    record = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "embedded SmolLM2-135M-Instruct", "dtype": engine.status().dtype, "clients": args.clients,
        "new_tokens": args.new_tokens, "seconds": args.seconds, "greedy": True,
        "prompt_tokens": {name: len(engine.prepare(params).prompt_token_ids) for name, params in loads.items()},
        "rounds": [],
    }
    record["rounds"], medians = interleaved_rounds(
        loads, args.rounds, lambda params: ours(engine, args.clients, args.seconds, args.new_tokens, [params]),
        "tokens_per_s",
    )
    record["median_tokens_per_s"] = medians
    record["required_over_no_tools"] = round(medians["tools_required"] / medians["no_tools"], 3)
    record["auto_over_no_tools"] = round(medians["tools_auto"] / medians["no_tools"], 3)
    record["required_over_same_prompt_no_grammar"] = round(
        medians["tools_required"] / medians["tools_prompt_no_grammar"], 3
    )
    record["tokens_per_request"] = {
        name: round(statistics.median(r["tokens_per_s"] * args.seconds / r["requests"]
                                      for r in record["rounds"] if r["load"] == name), 1)
        for name in loads
    }
    print(json.dumps({k: record[k] for k in ("prompt_tokens", "median_tokens_per_s", "required_over_no_tools",
                                             "auto_over_no_tools", "required_over_same_prompt_no_grammar",
                                             "tokens_per_request")}, indent=1))
    write_record(args.out, record)
    engine.close()


if __name__ == "__main__":
    main()
