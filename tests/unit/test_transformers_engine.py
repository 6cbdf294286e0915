"""The transformers engine on a tiny random model: lengths, stops, seeds, batching."""

import asyncio
import json
import logging
import time

import pytest

from deployments.config import ModelConfig
from deployments.protocol import ChatMessage, GenerationParams, InvalidRequestError, TokenizeParams
from deployments.transformers_engine import TransformersEngine
from deployments.transformers_engine.rows import Admission
from deployments.transformers_engine.scheduler import Outbox
from tests.tiny_model import TINY_CONTEXT_LENGTH


@pytest.fixture(scope="module", params=["dynamic", "slots"])
def engine(tiny_model_dir, request):
    # float32: these tests check the engine's logic against exact references (batched
    # equals alone, chunked equals whole), which bfloat16 rounding would blur; and they
    # watch every step, so every step is handed over. Both KV caches pass every test
    # (slots run eagerly here; tests/gpu replays them as CUDA graphs).
    config = ModelConfig(
        name="tiny", source=str(tiny_model_dir), dtype="float32", stream_interval_s=0, kv_cache=request.param
    )
    engine = TransformersEngine(config, "cpu")
    engine.load()
    yield engine
    engine.close()


def run(engine, *params: GenerationParams):
    """Generates the requests concurrently (the engine batches them); returns per request
    {index: (text, finish_reason, tokens)}."""

    async def one(prepared):
        texts, results = {}, {}
        async for deltas in engine.generate(prepared):
            for delta in deltas:
                assert delta.index not in results, "delta after the final one"
                texts[delta.index] = texts.get(delta.index, "") + delta.text
                if delta.finish_reason:
                    results[delta.index] = (texts[delta.index], delta.finish_reason, delta.completion_tokens)
        return results

    async def consume():
        return await asyncio.gather(*(one(engine.prepare(p)) for p in params))

    return list(asyncio.run(consume()))


async def streamed_text(engine, params: GenerationParams, decoding: asyncio.Event) -> str:
    """One request's text, streamed; sets ``decoding`` at its first step."""
    texts = []
    async for deltas in engine.generate(engine.prepare(params)):
        texts += [delta.text for delta in deltas]
        decoding.set()
    return "".join(texts)


def greedy(prompt="Once upon a time", **fields) -> GenerationParams:
    return GenerationParams(prompt=prompt, temperature=0.0, **fields)


def test_status_reports_device_dtype_and_context(engine):
    status = engine.status()
    assert (status.name, status.device, status.dtype) == ("tiny", "cpu", "float32")
    assert status.context_length == TINY_CONTEXT_LENGTH


def test_auto_dtype_is_bfloat16_where_matmuls_are_native(tiny_model_dir):
    import torch

    from deployments.transformers_engine.loading import cpu_has_amx, resolve_dtype

    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32
    native = cpu_has_amx()
    assert native == ("amx_tile" in open("/proc/cpuinfo").read().split())  # the probe sees the flag
    engine = TransformersEngine(ModelConfig(source=str(tiny_model_dir)), "cpu")
    engine.load()
    assert engine.status().dtype == ("bfloat16" if native else "float32")
    [result] = run(engine, greedy(max_new_tokens=5))
    assert result[0][1:] == ("length", 5)


def test_max_new_tokens_is_exact_and_finish_reason_length(engine):
    [result] = run(engine, greedy(max_new_tokens=9))
    text, reason, tokens = result[0]
    assert (reason, tokens) == ("length", 9) and text


def test_greedy_is_deterministic(engine):
    assert run(engine, greedy(max_new_tokens=12)) == run(engine, greedy(max_new_tokens=12))


def test_stop_string_ends_generation_and_is_excluded(engine):
    [[(full, _, _)]] = [list(r.values()) for r in run(engine, greedy(max_new_tokens=24))]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), "pick a visible stop string"
    [result] = run(engine, greedy(max_new_tokens=24, stop=(stop,)))
    text, reason, tokens = result[0]
    assert reason == "stop"
    assert text == full[: full.index(stop)]
    assert tokens < 24


def test_seed_reproduces_sampled_text_and_differs_across_seeds(engine):
    def sampled(seed):
        return run(engine, GenerationParams(prompt="Hello", max_new_tokens=16, temperature=1.0, seed=seed))

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)


def test_num_return_sequences_gives_distinct_seeded_sequences(engine):
    [result] = run(engine, GenerationParams(prompt="Hi", max_new_tokens=10, temperature=1.0, seed=3, num_return_sequences=3))
    assert sorted(result) == [0, 1, 2]
    assert len({result[i][0] for i in result}) == 3
    [single] = run(engine, GenerationParams(prompt="Hi", max_new_tokens=10, temperature=1.0, seed=3))
    assert single[0] == result[0], "sequence 0 uses the request's seed itself"


def test_mixed_parameters_in_one_batch_are_each_honoured(engine):
    requests = [
        greedy("The weather today", max_new_tokens=8),
        GenerationParams(prompt="A story", max_new_tokens=20, temperature=1.5, top_k=50, seed=11),
        GenerationParams(prompt="Numbers", max_new_tokens=5, temperature=0.7, top_p=0.5, seed=12),
        GenerationParams(prompt="Again", max_new_tokens=12, temperature=0.9, repetition_penalty=1.8, seed=13),
        greedy("x", max_new_tokens=3, num_return_sequences=2),
    ]
    batched = run(engine, *requests)
    alone = [run(engine, request)[0] for request in requests]
    assert batched == alone
    assert [r[0][2] for r in batched] == [8, 20, 5, 12, 3]


def hf_greedy_tokens(model_dir, prompt: str, max_new_tokens: int) -> list[int]:
    """What transformers' own generate() picks greedily: the reference for our loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    output = model.generate(
        input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None
    )
    return output[0, input_ids.shape[1] :].tolist()


def openai_penalized_greedy_text(model_dir, prompt: str, max_new_tokens: int, presence: float, frequency: float) -> str:
    """OpenAI's definition, step by step over the whole sequence (no cache): each
    token's logit less frequency x its count among the generated tokens, less presence
    if it was generated at all; then the likeliest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([prompt_ids + generated])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0]).float()
            generated.append(int((logits - frequency * counts - presence * (counts > 0).float()).argmax()))
            if generated[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(generated, skip_special_tokens=True)


@pytest.fixture(scope="module")
def flat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its output layer scaled down: its logits lie within a few
    units of each other, as a trained model's top candidates do, so that penalties of
    -2..2 change what greedy picks (the random model's logits spread too far)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.05)
    folder = tmp_path_factory.mktemp("flat-llama")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kv_cache", ["dynamic", "slots"])
def test_presence_and_frequency_penalties_are_openais_per_row(flat_model_dir, kv_cache):
    engine = TransformersEngine(
        ModelConfig(name="flat", source=str(flat_model_dir), dtype="float32", kv_cache=kv_cache), "cpu"
    )
    engine.load()
    # (presence, frequency): a negative presence makes the model repeat; the frequency
    # penalty then decides after how many repeats it stops.
    prompt, penalized = "Once upon a time", [(-2.0, -1.0), (-2.0, 0.9), (-2.0, 1.5), (2.0, 2.0)]
    try:
        results = run(
            engine,
            *(greedy(prompt, max_new_tokens=16, presence_penalty=p, frequency_penalty=f) for p, f in penalized),
            greedy(prompt, max_new_tokens=16),  # in the same batch, unpenalised
        )
    finally:
        engine.close()
    texts = [result[0][0] for result in results]
    for (presence, frequency), text in zip([*penalized, (0.0, 0.0)], texts, strict=True):
        assert text == openai_penalized_greedy_text(flat_model_dir, prompt, 16, presence, frequency)
    assert len(set(texts[:3] + texts[-1:])) == 4, f"the penalties changed the text: {texts}"


def test_extreme_valid_penalty_and_temperature_still_generate(engine):
    # Both are within the contract's bounds; float32 turns them into 0 and denormals.
    results = run(
        engine,
        greedy(max_new_tokens=6, repetition_penalty=5e-324),
        GenerationParams(prompt="Once", max_new_tokens=6, temperature=1e-40, seed=1),
        GenerationParams(prompt="Once", max_new_tokens=6, temperature=2.0, repetition_penalty=1e-40, top_p=1e-9),
    )
    assert [result[0][1:] for result in results] == [("length", 6)] * 3


def test_greedy_matches_transformers_generate(engine, tiny_model_dir):
    reference = hf_greedy_tokens(tiny_model_dir, "Once upon a time", 12)
    [result] = run(engine, greedy(max_new_tokens=12))
    assert result[0][0] == engine._tokenizer.decode(reference, skip_special_tokens=True)


def test_eos_ends_with_finish_reason_eos(tiny_model_dir, tmp_path):
    # Make the third token that greedy decoding produces the model's EOS.
    reference = hf_greedy_tokens(tiny_model_dir, "Once upon a time", 6)
    eos_id = reference[2]
    assert eos_id not in reference[:2]
    folder = tmp_path / "eos-model"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.name != "generation_config.json":
            (folder / item.name).symlink_to(item)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    engine = TransformersEngine(ModelConfig(source=str(folder), dtype="float32"), "cpu")
    engine.load()
    [result] = run(engine, greedy(max_new_tokens=6))
    text, reason, completion_tokens = result[0]
    assert reason == "eos"
    assert completion_tokens == 3, "the EOS token is generated and counted"
    assert text == engine._tokenizer.decode(reference[:2], skip_special_tokens=True)


def test_context_overflow_is_rejected_before_generation(engine):
    with pytest.raises(InvalidRequestError) as caught:
        engine.prepare(GenerationParams(prompt="word " * 300, max_new_tokens=10))
    assert "exceeds the model's context of 256 tokens" in caught.value.message


def test_more_sequences_than_the_batch_holds_are_refused_not_left_waiting(tiny_model_dir):
    engine = TransformersEngine(ModelConfig(name="tiny", source=str(tiny_model_dir), max_batch_size=2), "cpu")
    engine.load()
    try:
        with pytest.raises(InvalidRequestError) as caught:
            engine.prepare(GenerationParams(prompt="a", num_return_sequences=3))
        assert caught.value.param == "num_return_sequences"
        assert "3 sequences (n) is more than model tiny's max_batch_size of 2" in caught.value.message
        [fits] = run(engine, greedy(num_return_sequences=2, max_new_tokens=2))
        assert [fits[index][2] for index in (0, 1)] == [2, 2]
    finally:
        engine.close()


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(engine):
    async def consume():
        long = engine.prepare(greedy("A long one", max_new_tokens=40))
        short = engine.prepare(greedy("Keep going", max_new_tokens=6))
        seen = {"long": 0}

        async def read_long():
            async for deltas in engine.generate(long):
                seen["long"] = deltas[-1].completion_tokens
                if seen["long"] == 3:
                    long.cancelled.set()
            return seen["long"]

        async def read_short():
            last = None
            async for deltas in engine.generate(short):
                last = deltas[-1]
            return last.completion_tokens, last.finish_reason

        long_tokens, short_end = await asyncio.gather(read_long(), read_short())
        return long_tokens, short_end

    long_tokens, short_end = asyncio.run(consume())
    assert long_tokens == 3, "no output after the cancel"
    assert short_end == (6, "length"), "its neighbour finishes normally"


def test_requests_join_a_running_batch_and_leave_it_early(engine):
    """A request sent while another is decoding joins it between steps (continuous
    batching) and gets exactly the text it gets alone; a short one finishes first."""

    async def scenario():
        order = []

        async def collect(params, delay_s=0.0):
            await asyncio.sleep(delay_s)
            texts = {}
            async for deltas in engine.generate(engine.prepare(params)):
                for delta in deltas:
                    texts[delta.index] = texts.get(delta.index, "") + delta.text
            order.append(params.prompt)
            return texts

        long = greedy("The long one", max_new_tokens=200)
        late = GenerationParams(prompt="Late", max_new_tokens=5, temperature=1.0, seed=9)
        results = await asyncio.gather(collect(long), collect(late, delay_s=0.05))
        return results, order

    (long_text, late_text), order = asyncio.run(scenario())
    assert order == ["Late", "The long one"], "the late short request finished first"
    [alone_long] = run(engine, greedy("The long one", max_new_tokens=200))
    [alone_late] = run(engine, GenerationParams(prompt="Late", max_new_tokens=5, temperature=1.0, seed=9))
    assert long_text[0] == alone_long[0][0]
    assert late_text[0] == alone_late[0][0]


def test_a_long_prompt_never_pads_the_dynamic_batch_past_its_bound(tiny_model_dir):
    """Joined to three short rows, a 150-token prompt would pad each to its length (4 x
    ~155 tokens of KV); bounded, it waits for them to leave and runs alone, and every
    request still gets the text it gets alone."""
    engine = TransformersEngine(ModelConfig(source=str(tiny_model_dir), dtype="float32", kv_cache="dynamic",
                                            max_padded_tokens=160, stream_interval_s=0), "cpu")
    engine.load()
    widest = []
    step = engine._decoding._step

    def measured_step(batch):
        widest.append(len(batch.rows) * batch.attention_mask.shape[1])
        return step(batch)

    engine._decoding._step = measured_step
    long_prompt = "one two three four five six seven eight nine ten " * 15
    try:
        long_ids = engine.tokenize(TokenizeParams(prompt=long_prompt))
        assert 140 <= len(long_ids) <= 200

        async def scenario():
            decoding = asyncio.Event()

            short = [asyncio.ensure_future(streamed_text(engine, greedy(p, max_new_tokens=30), decoding))
                     for p in ("A", "B c", "D e f")]
            await decoding.wait()
            long = await streamed_text(engine, greedy(long_prompt, max_new_tokens=4), decoding)
            return [await task for task in short], long

        short_texts, long_text = asyncio.run(scenario())
        engine._decoding._step = step
        assert short_texts == [run(engine, greedy(p, max_new_tokens=30))[0][0][0] for p in ("A", "B c", "D e f")]
        assert long_text == run(engine, greedy(long_prompt, max_new_tokens=4))[0][0][0]
    finally:
        engine.close()
    # Three short rows of up to ~35 tokens, or the long one alone: never 4 x ~150.
    assert max(widest) <= len(long_ids) + 4, f"rows x width reached {max(widest)}"


def test_chunked_prefill_gives_the_same_text(tiny_model_dir):
    """Long prompts are prefilled a chunk at a time between decode steps; the result
    must not depend on the chunking, nor on the grouping by length (the two long
    prompts, of different lengths, share their chunks; the short ones go apart)."""
    prompts = ["word " * 40, "word " * 36 + "end", "A much shorter prompt", "x"]
    requests = [greedy(prompt, max_new_tokens=10) for prompt in prompts]
    whole = TransformersEngine(ModelConfig(source=str(tiny_model_dir), dtype="float32"), "cpu")
    whole.load()
    chunked = TransformersEngine(ModelConfig(source=str(tiny_model_dir), dtype="float32"), "cpu")
    chunked.load()
    chunked._scheduler.prefill_chunk_tokens = 6  # 2 columns per chunk for the two long prompts
    assert run(chunked, *requests) == run(whole, *requests)
    alone = [run(whole, request)[0] for request in requests]
    assert run(whole, *requests) == alone


def test_prefill_groups_keep_padding_small_and_short_prompts_first():
    from deployments.transformers_engine.scheduler import prefill_groups

    def uncached(*lengths):
        return [(0, length) for length in lengths]

    # Short prompts share a pass (a few columns of padding are allowed), long ones
    # group with long ones, and no prompt pads a much shorter one to its width.
    assert prefill_groups(uncached(300, 5, 12, 280, 8, 400)) == [[1, 4, 2], [3, 0, 5]]
    assert prefill_groups(uncached(300, 5, 150)) == [[1], [2], [0]]
    assert prefill_groups(uncached(7)) == [[0]]
    assert prefill_groups([]) == []
    lengths = [3, 50, 9, 120, 118, 1, 60, 64, 300]
    groups = prefill_groups(uncached(*lengths))
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        useful = sum(lengths[i] for i in group)
        assert max(lengths[i] for i in group) * len(group) <= useful * 1.25 + 16
    # Cached prefixes are padded to the group's longest too: a prompt with 1,000 tokens
    # cached does not share a pass with one that has none, however alike what is left.
    assert prefill_groups([(1000, 20), (0, 22), (992, 24), (0, 1020)]) == [[1], [3], [2, 0]]


def test_steps_a_slow_reader_missed_arrive_merged():
    from deployments.protocol import SequenceDelta
    from deployments.engine import merge_steps

    earlier = [SequenceDelta(0, "Hel", 2), SequenceDelta(1, "a", 2)]
    later = [SequenceDelta(0, "lo", 3, "length"), SequenceDelta(1, "", 3)]
    assert merge_steps(earlier, later) == [SequenceDelta(0, "Hello", 3, "length"), SequenceDelta(1, "a", 3)]


def test_an_engine_whose_steps_keep_failing_reports_itself_broken(tiny_model_dir):
    engine = TransformersEngine(ModelConfig(source=str(tiny_model_dir), dtype="float32"), "cpu")
    engine.load()
    engine.check_health()

    def failing_forward(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine._model.forward = failing_forward
    for attempt in range(3):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            run(engine, greedy(f"attempt {attempt}", max_new_tokens=4))
    with pytest.raises(RuntimeError, match="engine broken: 3 steps in a row failed"):
        engine.check_health()
    with pytest.raises(RuntimeError, match="engine broken"):
        engine.status()


def test_one_failing_batch_does_not_break_the_engine(tiny_model_dir):
    engine = TransformersEngine(ModelConfig(source=str(tiny_model_dir), dtype="float32"), "cpu")
    engine.load()
    real_forward = engine._model.forward
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return real_forward(*args, **kwargs)

    engine._model.forward = fail_once
    with pytest.raises(RuntimeError, match="out of memory"):
        run(engine, greedy("first", max_new_tokens=4))
    [result] = run(engine, greedy("second", max_new_tokens=4))
    assert result[0][1] == "length"
    engine.check_health()


@pytest.mark.parametrize("kv_cache", ["dynamic", "slots"])
def test_a_request_whose_prefill_fails_fails_alone(tiny_model_dir, kv_cache, caplog):
    """A prompt that trips the model (here: a poisoned token id raises in prefill) fails
    its request only: the requests prefilled in its group are retried one by one and
    finish as they would alone, and the batch already decoding goes on untouched."""
    serve_logger = logging.getLogger("ray.serve")  # Ray may have stopped it propagating to the root
    serve_logger.addHandler(caplog.handler)
    engine = TransformersEngine(
        ModelConfig(source=str(tiny_model_dir), dtype="float32", kv_cache=kv_cache, stream_interval_s=0), "cpu"
    )
    engine.load()
    poison = engine.tokenize(TokenizeParams(prompt=" zebra", add_special_tokens=False))[-1]
    real_forward = engine._model.forward

    def tripping_forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1 and bool((ids == poison).any()):  # a prefill holding it
            raise RuntimeError("the kernel tripped")
        return real_forward(*args, **kwargs)

    prompts = ["Once upon a time", "A zebra walked in", "The weather today"]
    alone = {prompt: run(engine, greedy(prompt, max_new_tokens=6))[0][0][0] for prompt in (prompts[0], prompts[2])}
    long_alone = run(engine, greedy("Numbers:", max_new_tokens=30))[0][0][0]
    engine._model.forward = tripping_forward
    try:
        async def together():
            decoding = asyncio.Event()

            running = asyncio.ensure_future(streamed_text(engine, greedy("Numbers:", max_new_tokens=30), decoding))
            await decoding.wait()  # it is in the batch before the wave comes
            wave = await asyncio.gather(*(streamed_text(engine, greedy(p, max_new_tokens=6), decoding) for p in prompts),
                                        return_exceptions=True)
            return await running, wave

        long_text, (first, poisoned, third) = asyncio.run(together())
    finally:
        engine.close()
        serve_logger.removeHandler(caplog.handler)
    assert isinstance(poisoned, RuntimeError) and "the kernel tripped" in str(poisoned)
    assert "a prefill of 3 requests failed" in caplog.text, "the wave was prefilled together, then one by one"
    assert (first, third) == (alone[prompts[0]], alone[prompts[2]])
    assert long_text == long_alone
    assert engine._scheduler.broken is None


def test_steps_are_handed_over_at_most_once_per_stream_interval(tiny_model_dir):
    """The first step and the finishing one go at once; steps in between are merged
    until the interval has passed. Interval 0 hands every step over."""

    def hand_overs(interval_s: float) -> tuple[int, str]:
        engine = TransformersEngine(
            ModelConfig(source=str(tiny_model_dir), dtype="float32", stream_interval_s=interval_s), "cpu"
        )
        engine.load()

        async def consume():
            items, text = 0, ""
            async for deltas in engine.generate(engine.prepare(greedy(max_new_tokens=12))):
                items += 1
                text += "".join(delta.text for delta in deltas)
                assert deltas[-1].completion_tokens == 1 or items > 1
            return items, text

        return asyncio.run(consume())

    every_step, held = hand_overs(0.0), hand_overs(5.0)
    assert every_step[0] == 12
    assert held[0] == 2, "the first token, then the other 11 with the finish"
    assert held[1] == every_step[1]


def test_steps_pile_up_only_while_the_caller_is_busy(tiny_model_dir):
    """Interval 0: a caller that takes each step at once gets every step; one that is
    busy meanwhile gets what piled up as one hand-over, and the same text."""
    engine = TransformersEngine(ModelConfig(source=str(tiny_model_dir), dtype="float32", stream_interval_s=0), "cpu")
    engine.load()

    async def consume(busy_s: float):
        outputs: asyncio.Queue = asyncio.Queue()
        outbox = Outbox(asyncio.get_running_loop(), outputs, 0.0)
        engine._scheduler.submit(Admission(engine.prepare(greedy(max_new_tokens=12)), outbox.deliver))
        items, text, finished = 0, "", False
        while not finished:
            deltas = await outputs.get()  # what the outbox handed over, unmerged by any reader
            items += 1
            text += "".join(delta.text for delta in deltas)
            finished = deltas[-1].finish_reason is not None
            if busy_s:
                await asyncio.to_thread(time.sleep, busy_s)  # the caller's own work, off the loop
        return items, text

    try:
        quick, busy = asyncio.run(consume(0.0)), asyncio.run(consume(0.2))
    finally:
        engine.close()
    assert quick[1] == busy[1]
    assert busy[0] < quick[0], "a busy caller gets merged steps"


def test_close_fails_what_is_unfinished_and_stops_the_scheduler(tiny_model_dir):
    engine = TransformersEngine(ModelConfig(source=str(tiny_model_dir), dtype="float32", stream_interval_s=0), "cpu")
    engine.load()
    prepared = engine.prepare(greedy(max_new_tokens=TINY_CONTEXT_LENGTH - 8))

    async def close_midway():
        async for _ in engine.generate(prepared):
            await asyncio.to_thread(engine.close)

    with pytest.raises(RuntimeError, match="the engine was closed"):
        asyncio.run(close_midway())
    with pytest.raises(RuntimeError, match="scheduler thread has stopped"):
        engine.check_health()


def test_an_engine_stuck_in_a_step_fails_its_health_check(tiny_model_dir):
    """A forward pass that hangs (a stuck kernel) with its thread alive: the health
    check fails after step_timeout_s, so Serve replaces the replica; it passes again
    once the engine moves on."""
    import threading
    import time

    engine = TransformersEngine(ModelConfig(source=str(tiny_model_dir), dtype="float32", step_timeout_s=0.3), "cpu")
    engine.load()
    real_forward = engine._model.forward
    release = threading.Event()

    def hanging_forward(*args, **kwargs):
        release.wait(10)
        return real_forward(*args, **kwargs)

    engine._model.forward = hanging_forward
    try:
        worker = threading.Thread(target=run, args=(engine, greedy("stuck", max_new_tokens=2)))
        worker.start()
        time.sleep(0.6)
        with pytest.raises(RuntimeError, match="engine stuck: a scheduler iteration has run for"):
            engine.check_health()
        release.set()
        worker.join(10)
        engine.check_health()
    finally:
        release.set()
        engine.close()


def test_tokenize_gives_what_a_generation_sees_and_detokenize_inverts_it(engine):
    from deployments.protocol import TokenizeParams

    prompt_ids = engine.tokenize(TokenizeParams(prompt="Once upon a time"))
    assert prompt_ids == list(engine.prepare(greedy("Once upon a time", max_new_tokens=1)).prompt_token_ids)
    assert engine.detokenize(prompt_ids).endswith("Once upon a time")
    if engine._tokenizer.chat_template:
        messages = (ChatMessage("user", "Hi"),)
        chat = GenerationParams(messages=messages, max_new_tokens=1)
        rendered = engine.tokenize(TokenizeParams(messages=messages, add_special_tokens=False))
        assert rendered == list(engine.prepare(chat).prompt_token_ids)
    with pytest.raises(InvalidRequestError) as caught:
        engine.detokenize([len(engine._tokenizer)])
    assert caught.value.param == "tokens"


def collect_logprobs(engine, params: GenerationParams) -> dict[int, tuple]:
    """Per sequence, the log probabilities of every delta, joined."""

    async def consume():
        joined: dict[int, tuple] = {}
        async for deltas in engine.generate(engine.prepare(params)):
            for delta in deltas:
                joined[delta.index] = joined.get(delta.index, ()) + delta.logprobs
        return joined

    return asyncio.run(consume())


def test_log_probabilities_are_the_models_own(engine, tiny_model_dir):
    """Checked against a forward pass over the whole text: the log-softmax of the raw
    scores at each position, whatever sampling did with them (temperature, top-k, a
    penalty); the alternatives are the likeliest tokens, best first."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for params in (
        greedy("Once upon a time", max_new_tokens=8, logprobs=5),
        GenerationParams(prompt="Sampled", max_new_tokens=8, temperature=1.3, top_k=20, seed=3,
                         frequency_penalty=1.0, logprobs=0, num_return_sequences=2),
    ):
        prompt_ids = list(engine.prepare(params).prompt_token_ids)
        for scored in collect_logprobs(engine, params).values():
            generated = [entry.chosen.token_id for entry in scored]
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()
            expected = logits[len(prompt_ids) - 1 : -1].log_softmax(dim=-1)
            assert len(scored) == params.max_new_tokens
            for position, entry in enumerate(scored):
                assert entry.chosen.logprob == pytest.approx(expected[position, entry.chosen.token_id].item(), abs=1e-4)
                assert entry.chosen.token == engine._tokenizer.decode([entry.chosen.token_id])
                assert len(entry.top) == params.logprobs
                best = expected[position].topk(params.logprobs or 1)
                assert [choice.token_id for choice in entry.top] == best.indices.tolist()[: params.logprobs]
                assert [choice.logprob for choice in entry.top] == pytest.approx(best.values.tolist()[: params.logprobs], abs=1e-4)
    assert collect_logprobs(engine, greedy(max_new_tokens=3)) == {0: ()}, "none unless asked"
