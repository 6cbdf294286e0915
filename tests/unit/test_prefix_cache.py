"""Automatic prefix caching: the block store alone, then the engine on the tiny model with
the cache and without, on both KV caches: the same greedy tokens (and log probabilities)
whether a prompt's prefix came from the cache or not, for shared system prompts, the next
turn of a conversation (which reuses the previous answer), batches mixing cached and
uncached prompts, n > 1, grammars, log probabilities and adapters; reused tokens reported
as cached_tokens."""

import asyncio
import dataclasses
import json

import pytest
import torch

from deployments.config import ModelConfig
from deployments.protocol import GenerationParams, OutputConstraint
from deployments.transformers_engine import TransformersEngine
from deployments.transformers_engine.prefix_cache import BLOCK_TOKENS, PrefixCache, block_hashes
from tests.unit.test_lora import adapter_dirs  # noqa: F401 - a fixture

# Prompts as token ids, so that every test knows exactly which tokens are shared.
SYSTEM = list(range(1000, 1090))  # 90 tokens: 5 whole blocks and 10 tokens
ASKS = [list(range(2000 + 7 * i, 2000 + 7 * i + 5 + i)) for i in range(6)]


def history(blocks: int = 1, layers: int = 2) -> torch.Tensor:
    """A made-up KV history in the cache's layout, each position's values its position."""
    tokens = blocks * BLOCK_TOKENS
    return torch.arange(tokens, dtype=torch.float32).expand(layers, 2, 2, 4, tokens).permute(0, 1, 2, 4, 3).clone()


def row(blocks: int, asked: list | None = None):
    """A row's `history_of` over ``history(blocks)``, noting each range asked for."""
    whole = history(blocks)

    def history_of(start: int, end: int) -> torch.Tensor:
        if asked is not None:
            asked.append((start, end))
        return whole[:, :, :, start:end]

    return history_of


def test_a_block_is_known_by_its_tokens_and_everything_before_them():
    first, second = list(range(16)), list(range(16, 32))
    assert block_hashes(first + second, None)[0] == block_hashes(first, None)[0]
    assert block_hashes(second + first, None)[1] != block_hashes(first + second, None)[0], "the same block after others"
    assert block_hashes(first, "terse") != block_hashes(first, None), "adapters never share KV"
    assert len(block_hashes(list(range(47)), None)) == 2, "only whole blocks"


def test_a_lookup_finds_the_longest_prefix_short_of_the_last_token():
    cache = PrefixCache(1 << 20)
    tokens = list(range(3 * BLOCK_TOKENS))
    cache.store(tokens, None, row(3))
    assert cache.lookup(tokens, None).tokens == 2 * BLOCK_TOKENS, "the last token's logits are always computed"
    assert cache.lookup([*tokens, 7], None).tokens == 3 * BLOCK_TOKENS
    assert cache.lookup([*tokens[:20], 99, *tokens[21:]], None).tokens == BLOCK_TOKENS, "diverges in block 2"
    assert cache.lookup(tokens, "terse").tokens == 0
    found = cache.lookup([*tokens, 7], None)
    assert torch.equal(torch.cat(found.blocks, dim=3), history(3)), "the blocks come back in order"


def test_storing_from_a_cached_prefix_copies_only_the_new_blocks():
    cache = PrefixCache(1 << 20)
    tokens = list(range(4 * BLOCK_TOKENS))
    cache.store(tokens[: 2 * BLOCK_TOKENS], None, row(2))
    asked = []
    cache.store(tokens, None, row(4, asked))
    assert asked == [(2 * BLOCK_TOKENS, 4 * BLOCK_TOKENS)], "only the blocks it lacks"
    assert len(cache) == 4
    assert torch.equal(torch.cat(cache.lookup([*tokens, 1], None).blocks, dim=3), history(4))
    cache.store(tokens, None, row(4, asked))
    assert len(asked) == 1, "nothing asked for when every block is kept"


def test_the_least_recently_used_chain_goes_first_and_its_end_before_its_start():
    block_bytes = history(1).numel() * 4
    cache = PrefixCache(4 * block_bytes)
    old, new = list(range(3 * BLOCK_TOKENS)), list(range(500, 500 + 2 * BLOCK_TOKENS))
    cache.store(old, None, row(3))
    cache.store(new, None, row(2))  # 5 blocks > 4: old's last block goes
    assert cache.bytes <= cache.budget_bytes and len(cache) == 4
    assert cache.lookup([*old, 1], None).tokens == 2 * BLOCK_TOKENS
    assert cache.lookup([*new, 1], None).tokens == 2 * BLOCK_TOKENS
    cache.lookup([*old, 1], None)  # old used last: new's end goes next
    cache.store(list(range(900, 900 + BLOCK_TOKENS)), None, row(1))
    assert cache.lookup([*new, 1], None).tokens == BLOCK_TOKENS
    assert cache.lookup([*old, 1], None).tokens == 2 * BLOCK_TOKENS
    too_long = list(range(3000, 3000 + 6 * BLOCK_TOKENS))
    cache.store(too_long, None, row(6))
    assert cache.bytes <= cache.budget_bytes, "a prefix longer than the budget keeps its start"
    assert cache.lookup([*too_long, 1], None).tokens == 4 * BLOCK_TOKENS


@pytest.fixture(scope="module", params=["dynamic", "slots"])
def engines(tiny_model_dir, adapter_dirs, request):  # noqa: F811 - the fixture imported above
    """The tiny model with the prefix cache and without, on one KV cache."""
    made = {}
    for name, megabytes in (("cached", None), ("uncached", 0)):
        config = ModelConfig(
            name="tiny", source=str(tiny_model_dir), dtype="float32", kv_cache=request.param,
            prefix_cache_mb=megabytes, adapters={name: str(path) for name, path in adapter_dirs.items()},
        )
        made[name] = TransformersEngine(config, "cpu")
        made[name].load()
    assert made["uncached"]._prefix_cache is None
    yield made
    for engine in made.values():
        engine.close()


def ids(*parts: list[int], **fields) -> GenerationParams:
    fields.setdefault("max_new_tokens", 12)
    return GenerationParams(prompt_token_ids=tuple(token for part in parts for token in part), temperature=0.0,
                            ignore_eos=True, **fields)


def generate(engine, *params: GenerationParams) -> list[dict]:
    """Runs the requests together; per request: each sequence's token ids and log
    probabilities (when asked for), and the cached tokens reported."""

    async def one(prepared):
        tokens, logprobs, cached = {}, {}, 0
        async for deltas in engine.generate(prepared):
            for delta in deltas:
                cached += delta.cached_tokens
                for entry in delta.logprobs:
                    tokens.setdefault(delta.index, []).append(entry.chosen.token_id)
                    logprobs.setdefault(delta.index, []).append(
                        [entry.chosen.logprob, *(choice.logprob for choice in entry.top)]
                    )
        return {"tokens": tokens, "logprobs": logprobs, "cached": cached}

    async def together():
        return await asyncio.gather(*(one(engine.prepare(p)) for p in params))

    return list(asyncio.run(together()))


def with_logprobs(params: GenerationParams, top: int = 0) -> GenerationParams:
    """Token ids come back through log probabilities (top: alternatives too)."""
    return dataclasses.replace(params, logprobs=top)


def assert_same_output(cached: list[dict], uncached: list[dict]) -> None:
    for with_cache, without in zip(cached, uncached, strict=True):
        assert with_cache["tokens"] == without["tokens"]
        for index, rows in without["logprobs"].items():
            assert torch.allclose(torch.tensor(with_cache["logprobs"][index]), torch.tensor(rows), atol=1e-4)


def whole_blocks(tokens: int) -> int:
    return tokens // BLOCK_TOKENS * BLOCK_TOKENS


def test_a_shared_system_prompt_is_prefilled_once(engines):
    first, second = with_logprobs(ids(SYSTEM, ASKS[0]), top=2), with_logprobs(ids(SYSTEM, ASKS[1]), top=2)
    cached = [generate(engines["cached"], first)[0], generate(engines["cached"], second)[0]]
    uncached = [generate(engines["uncached"], first)[0], generate(engines["uncached"], second)[0]]
    assert_same_output(cached, uncached)
    assert cached[0]["cached"] == 0, "the first test of its engine"
    assert cached[1]["cached"] == whole_blocks(len(SYSTEM))
    assert uncached[1]["cached"] == 0


def test_the_next_turn_reuses_the_previous_answer(engines):
    turn = with_logprobs(ids(SYSTEM, ASKS[2], max_new_tokens=40))
    answer = generate(engines["cached"], turn)[0]["tokens"][0]
    assert answer == generate(engines["uncached"], turn)[0]["tokens"][0]
    # The answer's last token was never fed back, so its KV is not there.
    next_turn = with_logprobs(ids(SYSTEM, ASKS[2], answer, ASKS[3]))
    cached = generate(engines["cached"], next_turn)
    assert cached[0]["cached"] == whole_blocks(len(SYSTEM) + len(ASKS[2]) + len(answer) - 1)
    assert_same_output(cached, generate(engines["uncached"], next_turn))


def test_a_batch_mixing_cached_and_new_prompts_decodes_as_without_the_cache(engines):
    """Rows whose prefixes have different lengths (and none) are prefilled and decoded
    together, with n > 1, a grammar, log probabilities and an adapter among them."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    primed = [ids(SYSTEM, ASKS[4]), ids(SYSTEM[:40], ASKS[5]), ids(SYSTEM, ASKS[5], adapter="terse")]
    for params in primed:
        generate(engines["cached"], params)
    wave = [
        with_logprobs(ids(SYSTEM, ASKS[4], [5, 6, 7], num_return_sequences=2)),
        with_logprobs(ids(SYSTEM[:40], ASKS[5], [8]), top=3),
        with_logprobs(ids(SYSTEM, [9, 10], max_new_tokens=30,
                          constraint=OutputConstraint("json_schema", json.dumps(schema), "response_format"))),
        with_logprobs(ids(SYSTEM, ASKS[5], [11], adapter="terse")),
        with_logprobs(ids(SYSTEM, ASKS[5], [11], adapter="chatty")),
        with_logprobs(ids(list(range(4000, 4030)))),
    ]
    cached = generate(engines["cached"], *wave)
    assert_same_output(cached, generate(engines["uncached"], *wave))
    assert len(cached[0]["tokens"]) == 2
    assert cached[0]["cached"] == whole_blocks(len(SYSTEM) + len(ASKS[4])), "then it diverges from the answer"
    assert cached[1]["cached"] == whole_blocks(40 + len(ASKS[5]))
    assert cached[3]["cached"] == whole_blocks(len(SYSTEM) + len(ASKS[5])), "its own adapter's blocks"
    assert cached[4]["cached"] == 0, "another adapter's KV is never reused"
    assert cached[5]["cached"] == 0


def test_prompts_sent_together_prefill_their_shared_prefix_once(engines):
    """The first of them computes it; the others wait one wave and find it cached."""
    shared = list(range(5000, 5070))
    wave = [with_logprobs(ids(shared, ask)) for ask in ASKS[:4]]
    cached = generate(engines["cached"], *wave)
    assert_same_output(cached, generate(engines["uncached"], *wave))
    assert [result["cached"] for result in cached] == [0, *(whole_blocks(len(shared)) for _ in ASKS[1:4])]


def test_a_request_waiting_for_a_block_of_its_wave_holds_back_no_one_else(engines):
    """One tenant's three requests sent together: the second shares the first's new
    prefix and waits one wave; the third shares nothing and joins the first's wave."""
    engine = engines["cached"]
    shared = list(range(6000, 6070))
    prepared = [engine.prepare(ids(shared, ASKS[0])), engine.prepare(ids(shared, ASKS[1])),
                engine.prepare(ids(list(range(7000, 7040))))]

    async def together():
        async def drain(one):
            async for _ in engine.generate(one):
                pass

        await asyncio.gather(*(drain(one) for one in prepared))

    asyncio.run(together())
    first, sharing, unrelated = (one.timings.batch_started_at for one in prepared)
    assert unrelated == first and sharing > first


def test_a_full_cache_evicts_and_still_gives_the_same_output(engines):
    cache = engines["cached"]._prefix_cache
    budget = cache.budget_bytes
    model = engines["cached"]._model.config  # float32 keys and values of every layer
    head_dim = model.hidden_size // model.num_attention_heads
    block_bytes = BLOCK_TOKENS * 2 * model.num_hidden_layers * model.num_key_value_heads * head_dim * 4
    try:
        cache.budget_bytes = 6 * block_bytes  # room for one system prompt and a bit
        for ask in ASKS:
            turn = with_logprobs(ids(list(range(3000, 3080)), ask))
            assert_same_output(generate(engines["cached"], turn), generate(engines["uncached"], turn))
            assert cache.bytes <= cache.budget_bytes
    finally:
        cache.budget_bytes = budget
