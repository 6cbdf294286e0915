"""vLLM's sampling extensions in the tiny_engine, on both KV caches (the tiny random model):
stop_token_ids end a sequence (their text kept only when asked), min_tokens holds the
ends back, stop strings can be kept, special tokens can be kept."""

import asyncio

import pytest

from deployments.protocol import GenerationParams, InvalidRequestError
from deployments.transformers_engine.rows import Admission


def run(tiny_engine, params: GenerationParams):
    """(text, finish reason, token ids) of the request's one sequence."""

    async def one():
        text, ids, reason = "", [], None
        async for deltas in tiny_engine.generate(tiny_engine.prepare(params)):
            for delta in deltas:
                text += delta.text
                ids += [entry.chosen.token_id for entry in delta.logprobs]
                reason = delta.finish_reason or reason
        return text, reason, ids

    return asyncio.run(one())


def greedy(**fields) -> GenerationParams:
    return GenerationParams(prompt="Once upon a time", temperature=0.0, max_new_tokens=12, logprobs=0, **fields)


def test_a_stop_token_id_ends_the_sequence_and_is_kept_only_when_asked(tiny_engine):
    text, reason, ids = run(tiny_engine, greedy())
    assert reason == "length" and len(ids) == 12
    stop_at = next(i for i in range(2, 12) if ids[i] not in ids[:i])  # its first time
    stopped, reason, stopped_ids = run(tiny_engine, greedy(stop_token_ids=(ids[stop_at],)))
    assert reason == "stop" and stopped_ids == ids[: stop_at + 1]
    kept, _, _ = run(tiny_engine, greedy(stop_token_ids=(ids[stop_at],), include_stop_str_in_output=True))
    assert len(kept) > len(stopped) and kept.startswith(stopped) and text.startswith(kept)


def test_min_tokens_holds_the_stop_tokens_back(tiny_engine):
    _, _, ids = run(tiny_engine, greedy())
    early = ids[1]
    _, reason, held_ids = run(tiny_engine, greedy(stop_token_ids=(early,), min_tokens=6))
    assert early not in held_ids[:6], "a stop token before min_tokens"
    assert len(held_ids) >= 6 and (reason == "length" or held_ids[-1] == early)


def test_include_stop_str_in_output_keeps_the_stop_string(tiny_engine):
    text, _, _ = run(tiny_engine, greedy())
    stop = text[3:6]
    cut, reason, _ = run(tiny_engine, greedy(stop=(stop,)))
    kept, _, _ = run(tiny_engine, greedy(stop=(stop,), include_stop_str_in_output=True))
    assert reason == "stop" and kept == cut + stop and text.startswith(kept)


def sequence(tiny_engine, params: GenerationParams):
    """A row of ``params`` as the scheduler makes it, to hand tokens to by hand (the
    random model seldom chooses EOS itself)."""
    prepared = tiny_engine.prepare(params)
    return tiny_engine._delivery.row(Admission(prepared, lambda item: None), 0)


def test_ignore_eos_goes_on_past_the_end_of_text_and_special_tokens_can_be_kept(tiny_engine):
    eos = min(tiny_engine._delivery.eos_token_ids)
    ends = sequence(tiny_engine, greedy())
    assert ends.advance(eos, tiny_engine._delivery.eos_token_ids).finish_reason == "eos"
    goes_on = sequence(tiny_engine, greedy(ignore_eos=True))
    delta = goes_on.advance(eos, tiny_engine._delivery.eos_token_ids)
    assert delta.finish_reason is None and delta.text == "" and not goes_on.finished
    kept = sequence(tiny_engine, greedy(ignore_eos=True, skip_special_tokens=False))
    assert kept.advance(eos, tiny_engine._delivery.eos_token_ids).text == tiny_engine.detokenize([eos])


def test_out_of_range_stop_token_ids_and_min_tokens_are_refused(tiny_engine):
    with pytest.raises(InvalidRequestError) as refused:
        tiny_engine.prepare(greedy(stop_token_ids=(10**9,)))
    assert refused.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequestError) as refused:
        tiny_engine.prepare(greedy(min_tokens=13))
    assert refused.value.param == "min_tokens"
