"""The slot decoder (the GPU's KV cache, run eagerly here) against the dynamic-cache path
on the tiny model: same greedy tokens under joins, leaves and compaction; its sampler."""

import asyncio
import dataclasses
import math

import pytest
import torch

from deployments.config import ModelConfig
from deployments.protocol import GenerationParams
from deployments.transformers_engine import TransformersEngine
from deployments.transformers_engine.sampling import counter_uniforms, sample_rows
from deployments.transformers_engine.slot_decoder import SlotShape, column_buckets, row_buckets, tokens_per_slot
from tests.unit.test_grammars import json_schema


def generate_all(engine, params):
    """Runs ``params`` concurrently; per request, (texts by index, finish reasons, tokens)."""

    async def one(request):
        texts, ends = {}, {}
        async for deltas in engine.generate(engine.prepare(request)):
            for delta in deltas:
                texts[delta.index] = texts.get(delta.index, "") + delta.text
                if delta.finish_reason:
                    ends[delta.index] = (delta.finish_reason, delta.completion_tokens)
        return texts, ends

    async def everything():
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in params)), 120)

    return asyncio.run(everything())


def load(tiny_model_dir, kv_cache, max_batch_size=4):
    engine = TransformersEngine(
        ModelConfig(name="tiny", source=str(tiny_model_dir), dtype="float32", kv_cache=kv_cache,
                    max_batch_size=max_batch_size),
        "cpu",
    )
    engine.load()
    return engine


# More requests than rows, of different prompt and output lengths: rows join as others
# leave, the last rows move into the gaps, and every kind of ending happens.
WORKLOAD = [
    *(GenerationParams(prompt="Once upon a time " * k, max_new_tokens=5 + 4 * k, temperature=0) for k in range(1, 8)),
    GenerationParams(prompt="hello there", max_new_tokens=24, temperature=0, repetition_penalty=1.3),
    GenerationParams(prompt="hello there", max_new_tokens=24, temperature=0, num_return_sequences=2, stop=["e"]),
    GenerationParams(prompt="x", max_new_tokens=30, temperature=0, top_k=1),
]


def test_slots_give_the_dynamic_caches_greedy_tokens(tiny_model_dir):
    results = {}
    for kv_cache in ("dynamic", "slots"):
        engine = load(tiny_model_dir, kv_cache)
        try:
            results[kv_cache] = generate_all(engine, WORKLOAD)
        finally:
            engine.close()
    assert results["slots"] == results["dynamic"]
    finishes = {reason for _, ends in results["slots"] for reason, _ in ends.values()}
    assert finishes >= {"length", "stop"}


def test_sampled_rows_depend_on_their_seed_only(tiny_model_dir):
    """A seeded sampled request gets the same text alone and amid other rows (its draws
    are a function of its seed and its token count); other seeds differ."""
    engine = load(tiny_model_dir, "slots")
    try:
        seeded = GenerationParams(prompt="Sampled", max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
        [(alone, _)] = generate_all(engine, [seeded])
        crowd = generate_all(engine, [*WORKLOAD[:5], seeded, dataclasses.replace(seeded, seed=8)])
        assert crowd[5][0] == alone
        assert crowd[6][0] != alone
        [(twice, _)] = generate_all(engine, [dataclasses.replace(seeded, num_return_sequences=2)])
        assert twice[0] == alone[0] and twice[1] != alone[0], "sequence 0 keeps the request's seed"
    finally:
        engine.close()


def test_slot_context_is_the_context_on_a_cpu(tiny_model_dir):
    engine = load(tiny_model_dir, "slots")
    try:
        assert engine.status().context_length == 256
        assert engine._decoding.decoder.slot_length == 256
        assert not engine._decoding.decoder.uses_graphs, "graphs are CUDA only"
    finally:
        engine.close()


def test_buckets_cover_every_size_with_little_padding():
    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert row_buckets(12) == [1, 2, 4, 8, 12]
    assert row_buckets(1) == [1]
    assert column_buckets(256) == [128, 256]
    assert column_buckets(4600) == [128, 256, 512, 1024, 2048, 4096, 4600]
    assert column_buckets(100) == [100]


def test_tokens_per_slot_leave_room_for_weights_and_activations():
    shape = SlotShape(layers=24, kv_heads=32, head_dim=64, dtype=torch.bfloat16)
    assert shape.bytes_per_token() == 2 * 24 * 32 * 64 * 2
    gib = 1 << 30
    # 140 GiB card, 0.5 of it ours, 4 GiB used by weights, 2 GiB reserved: 64 GiB of KV.
    fits = tokens_per_slot(140 * gib, 136 * gib, 0.5, 2 * gib, shape, slots=64)
    assert fits == 64 * gib // (shape.bytes_per_token() * 64)
    assert tokens_per_slot(10 * gib, 2 * gib, 0.5, gib, shape, slots=8) < 0, "over budget already"


def sample(logits, **params):
    rows = logits.shape[0]

    def per_row(value, dtype=torch.float32):
        return torch.full((rows,), value, dtype=dtype)

    return sample_rows(
        logits,
        temperature=per_row(params.get("temperature", 1.0)),
        top_p=per_row(params.get("top_p", 1.0)),
        top_k=per_row(params.get("top_k", 0), torch.long),
        penalty=per_row(params.get("penalty", 1.0)),
        seen=params.get("seen", torch.zeros_like(logits, dtype=torch.bool)),
        presence=per_row(params.get("presence", 0.0)),
        frequency=per_row(params.get("frequency", 0.0)),
        counts=params.get("counts", torch.zeros_like(logits, dtype=torch.int16)),
        seeds=params.get("seeds", torch.arange(rows)),
        counters=per_row(0, torch.long),
        sampled=True,
    )


def test_counter_uniforms_are_uniform_and_reproducible():
    seeds = torch.arange(20000) * 7919
    values = counter_uniforms(seeds, torch.zeros_like(seeds))
    assert bool(((values >= 0) & (values < 1)).all())
    assert abs(values.mean().item() - 0.5) < 0.01
    assert torch.equal(values, counter_uniforms(seeds, torch.zeros_like(seeds)))
    assert not torch.equal(values, counter_uniforms(seeds, torch.ones_like(seeds)))
    big = torch.tensor([(1 << 63) - 1, 1 << 40])
    assert bool(((counter_uniforms(big, big) >= 0) & (counter_uniforms(big, big) < 1)).all())


def test_sampled_frequencies_follow_the_distribution_after_top_k_and_top_p():
    probabilities = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probabilities.log().repeat(40000, 1)
    counts = torch.bincount(sample(logits), minlength=4) / 40000
    assert torch.allclose(counts, probabilities, atol=0.01)
    top_two = torch.bincount(sample(logits, top_k=2), minlength=4) / 40000
    assert torch.allclose(top_two, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.01)
    # top_p 0.7: 0.5 then 0.25 (0.5 before it is not past 0.7), then stop (0.75 is).
    nucleus = torch.bincount(sample(logits, top_p=0.7), minlength=4) / 40000
    assert torch.allclose(nucleus, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.01)
    cold = torch.bincount(sample(logits, temperature=0.25), minlength=4) / 40000
    expected = probabilities ** 4 / (probabilities ** 4).sum()
    assert torch.allclose(cold, expected, atol=0.01)


def test_greedy_rows_and_the_repetition_penalty_match_the_batch_sampler():
    from deployments.transformers_engine.sampling import BatchSampler, RowSampling

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    seen = torch.zeros(6, 50, dtype=torch.bool)
    seen[:, logits[0].argmax()] = True
    prompts = [[int(logits[0].argmax())]] * 6
    rows = [RowSampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=2.5, seed=None)] * 6
    expected = BatchSampler(rows, prompts, 50, "cpu").sample(logits)
    assert torch.equal(sample(logits, temperature=0.0, penalty=2.5, seen=seen), expected)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(dim=-1))
    assert math.isfinite(float(sample(torch.full((1, 50), 1e38), temperature=1e-30)[0]))


def test_presence_and_frequency_penalties_match_the_batch_sampler():
    from deployments.transformers_engine.sampling import BatchSampler, RowSampling

    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    favourite = int(logits[1].argmax())
    generated = torch.tensor([[3, 3, 3, 7], [favourite, favourite, 5, 6], [8, 9, 10, 11], [1, 2, 1, 1]])
    counts = torch.stack([torch.bincount(tokens, minlength=50) for tokens in generated]).to(torch.int16)
    row = RowSampling(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None,
                      presence_penalty=0.7, frequency_penalty=1.5)
    sampler = BatchSampler([row] * 4, [[0]] * 4, 50, "cpu")
    for step in range(generated.shape[1]):
        sampler.observe(generated[:, step])
    expected = (logits - 1.5 * counts - 0.7 * (counts > 0)).argmax(dim=-1)
    assert torch.equal(sampler.sample(logits), expected)
    assert torch.equal(sample(logits, temperature=0.0, presence=0.7, frequency=1.5, counts=counts), expected)
    assert not torch.equal(expected, logits.argmax(dim=-1)), "the penalties changed some row's choice"


@pytest.mark.parametrize("kv_cache", ["slots"])
def test_a_failed_join_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir, kv_cache):
    engine = load(tiny_model_dir, kv_cache)
    try:
        decoder = engine._decoding.decoder
        real_join = decoder.join
        calls = {"n": 0}

        def fail_once(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("out of memory")
            return real_join(*args, **kwargs)

        decoder.join = fail_once
        with pytest.raises(RuntimeError, match="out of memory"):
            generate_all(engine, [WORKLOAD[0]])
        [(texts, ends)] = generate_all(engine, [WORKLOAD[0]])
        assert ends[0] == ("length", WORKLOAD[0].max_new_tokens)
    finally:
        engine.close()


def test_steps_padded_to_their_buckets_give_the_same_tokens(tiny_model_dir):
    """What a CUDA graph replays, run eagerly: rows padded with free slots up to the
    rows bucket, attention over the columns bucket (masked past each row's length)."""
    engine = load(tiny_model_dir, "slots", max_batch_size=6)
    try:
        engine._decoding.decoder.bucketed = True
        sampled = [GenerationParams(prompt="Sampled", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=s)
                   for s in range(2)]
        # Masked (the padding rows then allow every token) and penalised rows too.
        steered = [
            GenerationParams(prompt="JSON", max_new_tokens=60, temperature=1.0, seed=5, constraint=json_schema("flat")),
            GenerationParams(prompt="Again", max_new_tokens=20, temperature=0, presence_penalty=-2.0,
                             frequency_penalty=0.9),
        ]
        padded = generate_all(engine, [*WORKLOAD, *sampled, *steered])
        engine._decoding.decoder.bucketed = False
        exact = generate_all(engine, [*WORKLOAD, *sampled, *steered])
    finally:
        engine.close()
    assert padded == exact
