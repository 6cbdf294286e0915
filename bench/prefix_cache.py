"""What automatic prefix caching gives: time to first token and tokens/s of chat, agent
and unique-prompt loads with the prefix cache on and off, in-process on this machine,
interleaved rounds.

    python bench/prefix_cache.py [--rounds 2] [--conversations 16] [--turns 6]

Same model (the embedded SmolLM2-135M), dtype, threads and greedy decoding for every
load; the two engines (cache on, cache off) live in one process and take turns, and the
cache is emptied before each of its runs, so every run starts cold.

- `chat` (workload A): conversations x turns, all conversations at once, each sharing a
  1,000-token system prompt; every turn resends the whole history with the model's own
  previous answers, plus a new question.
- `agent` (workload B): the same number of agent loops, each resending a ~1,500-token
  tool list (12 tools) and its growing history of tool calls and results.
- `unique` (workload C): the same number of clients sending prompts that share nothing,
  to show what looking up and storing costs when nothing is reused.

Time to first token is from a request's submission to its first delta; tokens/s counts
generated tokens over a run's whole time, prefill included. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, percentile, write_record  # noqa: E402
from deployments.config import ModelConfig  # noqa: E402
from deployments.protocol import ChatMessage, GenerationParams, TokenizeParams, ToolCall, ToolSpec, ToolUse  # noqa: E402
from deployments.transformers_engine import TransformersEngine  # noqa: E402

WORDS = ("policy customer refund order account shipping invoice warranty support ticket escalation "
         "priority billing subscription renewal discount region language tone answer brief polite "
         "never always verify identity before sharing details record summary handoff").split()


def prose(seed: int, words: int) -> str:
    chooser = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        length = chooser.randint(8, 16)
        sentences.append(" ".join(chooser.choice(WORDS) for _ in range(length)).capitalize() + ".")
    return " ".join(sentences)


def question(conversation: int, turn: int) -> str:
    """A chat turn's new question (workload A)."""
    return f"Customer {conversation}, question {turn}: {prose(conversation * 100 + turn, 12)}"


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The load's shape, shared with bench/prefix_routing.py."""
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=1000)


def token_count(engine: TransformersEngine, text: str) -> int:
    return len(engine.tokenize(TokenizeParams(prompt=text)))


def system_prompt(count_tokens: Callable[[str], int], tokens: int) -> str:
    """Instructions of at most ``tokens`` tokens, as ``count_tokens`` counts them."""
    words = tokens
    while count_tokens(prose(0, words)) > tokens:
        words -= 10
    return prose(0, words)


TOOLS = tuple(
    ToolSpec(
        f"tool_{index}_{WORDS[index % len(WORDS)]}",
        prose(100 + index, 14),
        json.dumps({
            "type": "object", "required": ["query", "limit"],
            "properties": {"query": {"type": "string", "description": prose(200 + index, 6)},
                           "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
        }),
    )
    for index in range(12)
)


class Run:
    """One load on one engine: every request's time to first token, and the tokens."""

    def __init__(self, engine: TransformersEngine, new_tokens: int) -> None:
        self.engine, self.new_tokens = engine, new_tokens
        self.ttft: list[float] = []
        self.generated = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    async def ask(self, params: GenerationParams) -> str:
        prepared = self.engine.prepare(params)
        self.prompt_tokens += len(prepared.prompt_token_ids)
        submitted = time.perf_counter()
        text, first = "", True
        async for deltas in self.engine.generate(prepared):
            if first:
                self.ttft.append(time.perf_counter() - submitted)
                first = False
            for delta in deltas:
                text += delta.text
                self.cached_tokens += delta.cached_tokens
                if delta.finish_reason is not None:
                    self.generated += delta.completion_tokens
        return text

    def params(self, **fields) -> GenerationParams:
        return GenerationParams(max_new_tokens=self.new_tokens, temperature=0.0, **fields)


async def chat(run: Run, conversations: int, turns: int, system: str) -> None:
    async def conversation(number: int) -> None:
        messages = [ChatMessage("system", system)]
        for turn in range(turns):
            messages.append(ChatMessage("user", question(number, turn)))
            answer = await run.ask(run.params(messages=tuple(messages)))
            messages.append(ChatMessage("assistant", answer))

    await asyncio.gather(*(conversation(number) for number in range(conversations)))


async def agent(run: Run, loops: int, turns: int) -> None:
    async def loop(number: int) -> None:
        messages = [ChatMessage("user", f"Task {number}: {prose(5000 + number, 16)}")]
        for turn in range(turns):
            await run.ask(run.params(messages=tuple(messages), tool_use=ToolUse(TOOLS, "auto")))
            call = ToolCall(f"call_{number}_{turn}", TOOLS[(number + turn) % len(TOOLS)].name,
                            json.dumps({"query": prose(number * 10 + turn, 4), "limit": 5}))
            messages.append(ChatMessage("assistant", "", tool_calls=(call,)))
            messages.append(ChatMessage("tool", prose(9000 + number * 10 + turn, 30), tool_call_id=call.id))

    await asyncio.gather(*(loop(number) for number in range(loops)))


async def unique(run: Run, clients: int, turns: int) -> None:
    async def client(number: int) -> None:
        for turn in range(turns):
            # A number first: no two prompts share even their first block.
            await run.ask(run.params(prompt=f"{number * 1000 + turn}: {prose(7000 + number * 100 + turn, 280)}"))

    await asyncio.gather(*(client(number) for number in range(clients)))


def measure(engine: TransformersEngine, load: str, args, system: str) -> dict:
    if engine._prefix_cache is not None:
        engine._prefix_cache.clear()  # every run starts cold
    run = Run(engine, args.new_tokens)
    workload = {
        "chat": lambda: chat(run, args.conversations, args.turns, system),
        "agent": lambda: agent(run, args.conversations, args.turns),
        "unique": lambda: unique(run, args.conversations, args.turns),
    }[load]
    started = time.perf_counter()
    asyncio.run(workload())
    elapsed = time.perf_counter() - started
    return {
        "seconds": round(elapsed, 2), "requests": len(run.ttft), "generated_tokens": run.generated,
        "tokens_per_s": round(run.generated / elapsed, 2),
        "ttft_p50_s": round(statistics.median(run.ttft), 3), "ttft_p90_s": round(percentile(run.ttft, 0.9), 3),
        "prompt_tokens": run.prompt_tokens, "cached_tokens": run.cached_tokens,
        "hit_rate": round(run.cached_tokens / run.prompt_tokens, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--loads", default="chat,agent,unique")
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix_cache.json"))
    args = parser.parse_args()
    engines = {}
    for name, megabytes in (("cache_on", None), ("cache_off", 0)):
        engines[name] = TransformersEngine(ModelConfig(max_batch_size=args.conversations, prefix_cache_mb=megabytes), "cpu")
        engines[name].load()
    system = system_prompt(lambda text: token_count(engines["cache_on"], text), args.system_tokens)
    loads = args.loads.split(",")
    record = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": "embedded SmolLM2-135M-Instruct", "dtype": engines["cache_on"].status().dtype,
        "conversations": args.conversations, "turns": args.turns, "new_tokens": args.new_tokens,
        "system_prompt_tokens": token_count(engines["cache_on"], system),
        "tool_list_tokens": len(engines["cache_on"].prepare(
            GenerationParams(messages=(ChatMessage("user", "x"),), tool_use=ToolUse(TOOLS, "auto"))
        ).prompt_token_ids),
        "greedy": True, "runs": [],
    }
    for round_number in range(args.rounds):
        for load in loads:
            for name, engine in engines.items():
                result = measure(engine, load, args, system)
                record["runs"].append({"round": round_number, "load": load, "cache": name, **result})
                print(f"round {round_number} {load:>7} {name:>9}: ttft p50 {result['ttft_p50_s']:.2f} s, "
                      f"{result['tokens_per_s']:.1f} tokens/s, hit rate {result['hit_rate']:.2f}", flush=True)
    summary = {}
    for load in loads:
        def median(cache: str, field: str, load=load) -> float:
            return statistics.median(r[field] for r in record["runs"] if r["load"] == load and r["cache"] == cache)

        summary[load] = {
            "ttft_p50_s": {cache: median(cache, "ttft_p50_s") for cache in engines},
            "tokens_per_s": {cache: median(cache, "tokens_per_s") for cache in engines},
            "hit_rate": median("cache_on", "hit_rate"),
            "ttft_off_over_on": round(median("cache_off", "ttft_p50_s") / median("cache_on", "ttft_p50_s"), 2),
            "tokens_per_s_on_over_off": round(median("cache_on", "tokens_per_s") / median("cache_off", "tokens_per_s"), 3),
        }
    record["summary"] = summary
    print(json.dumps(summary, indent=1))
    write_record(args.out, record)
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
