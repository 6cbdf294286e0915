"""Every validation rule of POST /generate's body, with its message."""

import json

import pytest
from pydantic import ValidationError

from serve_app.schemas import GenerateRequest


def errors_of(**body) -> list[dict]:
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate({"prompt": "hi", **body})
    return caught.value.errors()


def test_defaults_leave_sampling_to_the_engine():
    request = GenerateRequest.model_validate({"prompt": "hi"})
    params = request.to_generation_params("req-1")
    assert params.prompt == "hi" and params.request_id == "req-1"
    assert params.max_new_tokens is None and params.max_length is None
    assert params.temperature is None and params.top_p is None and params.top_k is None
    assert params.repetition_penalty is None and params.seed is None
    assert params.stop == () and params.num_return_sequences == 1
    assert request.stream is False and request.model is None


def test_every_field_converts():
    request = GenerateRequest.model_validate(
        {
            "prompt": "p", "max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "repetition_penalty": 1.2, "stop": ["a", "b"], "seed": 3, "num_return_sequences": 2,
            "stream": True, "model": "m", "presence_penalty": -0.5, "frequency_penalty": 2,
        }
    )
    params = request.to_generation_params("r")
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (7, 0.5, 0.9, 5)
    assert (params.repetition_penalty, params.stop, params.seed) == (1.2, ("a", "b"), 3)
    assert params.num_return_sequences == 2
    assert (params.presence_penalty, params.frequency_penalty) == (-0.5, 2)


def named_field(error: dict) -> str:
    """The field an error names: its location, or for a rule on several fields the
    field its exception names (as the error handler reads it)."""
    return error["loc"][0] if error["loc"] else error["ctx"]["error"].param


@pytest.mark.parametrize(
    "body, field, message",
    [
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"max_new_tokens": 0}, "max_new_tokens", "needs prompt_logprobs"),
        ({"prompt_token_ids": [1], "prompt": "a"}, "prompt", "one of them"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream: false"),
        ({"max_new_tokens": 4097}, "max_new_tokens", "less than or equal to 4096"),
        ({"max_length": 1}, "max_length", "greater than or equal to 2"),
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"temperature": 2.01}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"repetition_penalty": 10.5}, "repetition_penalty", "less than or equal to 10"),
        ({"presence_penalty": -2.1}, "presence_penalty", "greater than or equal to -2"),
        ({"frequency_penalty": 2.5}, "frequency_penalty", "less than or equal to 2"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 items"),
        ({"stop": [""]}, "stop", "at least 1 character"),
        ({"stop": ["x" * 257]}, "stop", "at most 256 characters"),
        ({"stop": "."}, "stop", "valid list"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"seed": 2**63}, "seed", "less than or equal to"),
        ({"num_return_sequences": 0}, "num_return_sequences", "greater than or equal to 1"),
        ({"num_return_sequences": 5}, "num_return_sequences", "less than or equal to 4"),
        ({"stream": "yes"}, "stream", "valid boolean"),
        ({"max_new_tokens": "8"}, "max_new_tokens", "valid integer"),
        ({"temperature": "0.5"}, "temperature", "valid number"),
        ({"max_new_tokens": 8, "max_length": 20}, "max_length", "not both"),
        ({"unknown": 1}, "unknown", "Extra inputs are not permitted"),
        ({"json_schema": "{}"}, "json_schema", "valid dictionary"),
        ({"json_schema": {"enum": ["x" * 40_000]}}, "json_schema", "the limit is 32768"),
        ({"json_schema": {}, "regex": "a"}, "regex", "not both"),
        ({"regex": "a" * 1025}, "regex", "at most 1024 characters"),
    ],
)
def test_invalid_field_is_named_with_reason(body, field, message):
    errors = errors_of(**body)
    assert named_field(errors[0]) == field
    assert message in errors[0]["msg"]


def test_prompt_is_required():
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate({})
    assert named_field(caught.value.errors()[0]) == "prompt"


def test_max_length_alone_is_accepted():
    params = GenerateRequest.model_validate({"prompt": "p", "max_length": 20}).to_generation_params("r")
    assert params.max_length == 20 and params.max_new_tokens is None


def test_integer_json_is_a_valid_float():
    assert GenerateRequest.model_validate({"prompt": "p", "temperature": 1}).temperature == 1.0


def test_a_schema_or_an_expression_becomes_the_output_constraint():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    constraint = GenerateRequest.model_validate({"prompt": "p", "json_schema": schema}).to_generation_params("r").constraint
    assert (constraint.kind, constraint.param) == ("json_schema", "json_schema")
    assert list(json.loads(constraint.source)["properties"]) == ["b", "a"], "key order is the output's order"
    regex = GenerateRequest.model_validate({"prompt": "p", "regex": "[0-9]+"}).to_generation_params("r").constraint
    assert (regex.kind, regex.source, regex.param) == ("regex", "[0-9]+", "regex")
    assert GenerateRequest.model_validate({"prompt": "p"}).to_generation_params("r").constraint is None
