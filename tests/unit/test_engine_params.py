"""Conversion of request parameters into an engine request, and their precedence."""

import pytest
from transformers import GenerationConfig

from deployments.engine import SERVICE_DEFAULTS, SamplingDefaults, prepare_request, sequence_seed
from deployments.protocol import ChatMessage, GenerationParams, InvalidRequestError
from deployments.transformers_engine.engine import model_sampling_defaults


def test_unset_fields_take_the_defaults():
    prepared = prepare_request(GenerationParams(prompt="x"), [1, 2, 3], context_length=100)
    assert prepared.max_new_tokens == SERVICE_DEFAULTS.max_new_tokens == 64
    assert prepared.temperature == 1.0 and prepared.top_p == 1.0 and prepared.top_k == 0
    assert prepared.repetition_penalty == 1.0 and not prepared.greedy
    assert prepared.prompt_token_ids == (1, 2, 3)


def test_request_values_beat_model_defaults():
    model_defaults = SamplingDefaults(max_new_tokens=10, temperature=0.3, top_p=0.5, top_k=7)
    params = GenerationParams(prompt="x", max_new_tokens=5, temperature=0.0, top_k=0)
    prepared = prepare_request(params, [1], 100, model_defaults)
    assert (prepared.max_new_tokens, prepared.temperature, prepared.top_k) == (5, 0.0, 0)
    assert prepared.top_p == 0.5  # unset in the request: the model's default
    assert prepared.greedy


def test_max_length_counts_the_prompt():
    prepared = prepare_request(GenerationParams(prompt="x", max_length=10), [1, 2, 3], 100)
    assert prepared.max_new_tokens == 7


def test_max_length_not_above_prompt_is_rejected_with_numbers():
    with pytest.raises(InvalidRequestError) as caught:
        prepare_request(GenerationParams(prompt="x", max_length=3), [1, 2, 3], 100)
    assert caught.value.param == "max_length"
    assert "max_length (3)" in caught.value.message and "3 tokens" in caught.value.message


def test_context_overflow_names_both_numbers():
    with pytest.raises(InvalidRequestError) as caught:
        prepare_request(GenerationParams(prompt="x", max_new_tokens=60), list(range(50)), 100)
    message = caught.value.message
    assert caught.value.param == "max_new_tokens"
    assert "50 tokens" in message and "60 new tokens" in message and "context of 100" in message


def test_exactly_filling_the_context_is_allowed():
    prepared = prepare_request(GenerationParams(prompt="x", max_new_tokens=50), list(range(50)), 100)
    assert prepared.max_new_tokens == 50


def test_sequence_seeds_are_distinct_and_index_zero_is_the_seed():
    assert sequence_seed(42, 0) == 42
    assert len({sequence_seed(42, i) for i in range(4)} | {sequence_seed(43, i) for i in range(4)}) == 8


def test_model_generation_config_overrides_only_what_it_sets():
    assert model_sampling_defaults(GenerationConfig()) == SERVICE_DEFAULTS
    tuned = model_sampling_defaults(GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9))
    assert (tuned.temperature, tuned.top_p, tuned.top_k) == (0.6, 0.9, 0)
    greedy = model_sampling_defaults(GenerationConfig(do_sample=False, max_new_tokens=20))
    assert greedy.temperature == 0.0 and greedy.max_new_tokens == 20


def test_max_length_cannot_ask_for_more_new_tokens_than_the_cap():
    """max_length bounds prompt + new tokens; with a long context it could ask for more
    new tokens than max_new_tokens may (4096): it is capped, as every other way of asking."""
    from deployments.protocol import MAX_NEW_TOKENS

    prepared = prepare_request(GenerationParams(prompt="x", max_length=20000), [1, 2, 3], 32768)
    assert prepared.max_new_tokens == MAX_NEW_TOKENS
    generous = SamplingDefaults(max_new_tokens=10000)
    assert prepare_request(GenerationParams(prompt="x"), [1], 32768, generous).max_new_tokens == MAX_NEW_TOKENS


def test_worst_case_tokens_bound_what_a_request_can_cost():
    plain = GenerationParams(prompt="héllo", max_new_tokens=10, num_return_sequences=3)
    assert plain.worst_case_tokens() == len("héllo".encode()) + 16 + 3 * 10
    chat = GenerationParams(messages=(ChatMessage("system", "be brief"), ChatMessage("user", "hi")))
    assert chat.worst_case_tokens() == (8 + 16) + (2 + 16) + 64  # default new tokens
    assert GenerationParams(prompt="x", max_length=9000).new_tokens_bound() == 4096
