"""Prompt scoring (echo with logprobs): each prompt token's log probability equals a
forward pass over the whole text, on both KV caches, in chunks, beside free and
generating rows, with n > 1, and with no new token at all."""

import asyncio

import pytest
import torch

from deployments.model_server import collect_result
from deployments.protocol import GenerationParams, InvalidRequestError
from deployments.transformers_engine import prompt_scores

TEXTS = [
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time there was a small model that scored its own prompts, one token at a time.",
    "Paris",
]


def results(tiny_engine, *params: GenerationParams):
    async def one(p):
        prepared = tiny_engine.prepare(p)
        return await collect_result("tiny", prepared, tiny_engine.generate(prepared))

    async def all_of_them():
        return await asyncio.gather(*(one(p) for p in params))

    return asyncio.run(all_of_them())


def reference(tiny_engine, ids: list[int]) -> torch.Tensor:
    """log P(token i | tokens before it) for i >= 1, and the log-softmax rows, from one
    forward pass over the whole text."""
    with torch.inference_mode():
        logprobs = tiny_engine._model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logprobs


def assert_scores_match(tiny_engine, ids, prompt_logprobs, top):
    expected = reference(tiny_engine, ids)
    assert [entry.chosen.token_id for entry in prompt_logprobs] == ids
    assert prompt_logprobs[0].chosen.logprob is None and prompt_logprobs[0].top == ()
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        assert entry.chosen.logprob == pytest.approx(expected[position - 1, ids[position]].item(), abs=1e-4)
        best = expected[position - 1].topk(top)
        assert [choice.token_id for choice in entry.top] == best.indices.tolist()
        assert [choice.logprob for choice in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("shown", [0, 1, 2])  # the group's most: none, the maximum alone, a top-k
@pytest.mark.parametrize("whole_logits", [False, True])
@pytest.mark.parametrize("chunk", [prompt_scores.SCORING_CHUNK_TOKENS, 7])
def test_prompt_logprobs_equal_a_forward_pass_beside_other_rows(tiny_engine, chunk, whole_logits, shown, monkeypatch):
    monkeypatch.setattr(prompt_scores, "SCORING_CHUNK_TOKENS", chunk)  # 7: many chunks, odd edges
    if whole_logits:  # as for a model whose head soft-caps its logits
        monkeypatch.setattr(tiny_engine._scheduler._model, "output_layer", None)
    prompts = [tiny_engine._tokenizer(text)["input_ids"] for text in TEXTS]
    scored = [
        GenerationParams(prompt_token_ids=tuple(ids), echo=True, prompt_logprobs=shown, max_new_tokens=0)
        for ids in prompts
    ]
    generating = GenerationParams(prompt_token_ids=tuple(prompts[1]), echo=True, prompt_logprobs=0,
                                  max_new_tokens=3, temperature=0.0, num_return_sequences=2)
    free = GenerationParams(prompt=TEXTS[0], max_new_tokens=4, temperature=0.0)
    *only_scored, generated, plain = results(tiny_engine, *scored, generating, free)
    for ids, result in zip(prompts, only_scored, strict=True):
        assert [s.completion_tokens for s in result.sequences] == [0] and result.sequences[0].finish_reason == "length"
        assert_scores_match(tiny_engine, ids, result.prompt_logprobs, top=shown)
    assert_scores_match(tiny_engine, prompts[1], generated.prompt_logprobs, top=0)
    assert [s.completion_tokens for s in generated.sequences] == [3, 3]
    assert plain.prompt_logprobs == () and plain.sequences[0].completion_tokens == 4
    alone = results(tiny_engine, GenerationParams(prompt=TEXTS[1], max_new_tokens=3, temperature=0.0))[0]
    assert generated.sequences[0].text == alone.sequences[0].text, "scoring changes no generated token"


def test_only_a_plain_output_layer_scores_from_hidden_states(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert prompt_scores.output_layer(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert prompt_scores.output_layer(model) is None


def test_out_of_vocabulary_ids_and_nothing_to_return_are_refused(tiny_engine):
    with pytest.raises(InvalidRequestError) as refused:
        tiny_engine.prepare(GenerationParams(prompt_token_ids=(1, 2, 10**6), max_new_tokens=1))
    assert refused.value.param == "prompt[2]"
    with pytest.raises(InvalidRequestError) as refused:
        tiny_engine.prepare(GenerationParams(prompt_token_ids=(1, 2), max_new_tokens=0))
    assert refused.value.param == "max_new_tokens"
