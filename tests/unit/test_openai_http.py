"""The OpenAI-compatible routes through the real `openai` client, over the fake engine
(in-process ASGI, no Ray). The live service is tested the same way in integration."""

import asyncio
import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from deployments.config import ModelConfig
from serve_app.access import AccessControl
from serve_app.args import AuthArgs, RateLimitArgs
from serve_app.ingress import Ingress, create_api
from serve_app.rate_limit import Quota
from tests.fakes import FakeEngine, FakeModelHandle, fake_source, fake_text


def make_app():
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    ingress = Ingress({"fake": FakeModelHandle(engine)}, RateLimitArgs(enabled=False), AuthArgs())
    return create_api(ingress, AccessControl(None, Quota()))


@pytest.fixture
def http():
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake"]
    assert client.models.retrieve("fake").owned_by == "ray-textgen"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completion_with_openai_names_and_defaults(client):
    completion = client.completions.create(model="fake", prompt="abc", seed=1)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == fake_text(1, 0, 16), "max_tokens defaults to 16 as at OpenAI"
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 16)


def test_completion_n_stop_echo_and_several_prompts(client):
    stopped = client.completions.create(model="fake", prompt="a", max_tokens=30, stop="fox")
    assert stopped.choices[0].text == "The quick brown " and stopped.choices[0].finish_reason == "stop"
    several = client.completions.create(model="fake", prompt=["ab", "cde"], max_tokens=3, n=2, seed=4, echo=True)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[2].text == "cde" + fake_text(4, 0, 3)
    assert several.usage.prompt_tokens == 5 and several.usage.completion_tokens == 12


def test_chat_completion(client):
    chat = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == fake_text(None, 0, 5)
    assert chat.usage.prompt_tokens == len("user: hi\n")


def test_streaming_completion_with_usage(client):
    chunks = list(
        client.completions.create(
            model="fake", prompt="ab", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == fake_text(None, 0, 4)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_streaming_chat_sends_role_then_content_then_finish(client):
    chunks = list(
        client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fake_text(None, 0, 3)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_async_client_streams_too(http):
    async def run():
        transport = httpx.ASGITransport(app=make_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as async_http:
            client = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="x", http_client=async_http)
            stream = await client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=4, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(run()) == fake_text(None, 0, 4)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 3}, "temperature"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"n": 9}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        # Strict types: none of these is quietly read as another type.
        ({"extra_body": {"stream": 0}}, "stream"),
        ({"seed": False}, "seed"),
        ({"max_tokens": "8"}, "max_tokens"),
    ],
)
def test_invalid_parameters_are_bad_request_errors_naming_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**{"model": "fake", "prompt": "a", **kwargs})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def test_chat_refuses_invalid_tools_and_top_logprobs_without_logprobs(client):
    for kwargs, param in (
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         "tools[0].function.parameters"),
        ({"tools": [WEATHER, {"type": "function", "function": {"name": "g", "parameters": {"enum": ["x" * 40000]}}}]},
         "tools[1].function.parameters"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], **kwargs)
        assert caught.value.body["param"] == param, (kwargs, caught.value.body)


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "tool", "content": "12 C"}, "messages.1"),
        ({"role": "user", "content": "x", "tool_call_id": "call_1"}, "messages.1"),
        ({"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function",
                                                          "function": {"name": "f", "arguments": "{}"}}]}, "messages.1"),
        ({"role": "assistant"}, "messages.1"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
         "messages.1.tool_calls.0.function.arguments"),
    ],
)
def test_chat_refuses_malformed_tool_turns_naming_the_message(client, message, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}, message])
    assert caught.value.body["param"] == param, caught.value.body


def test_unknown_model_is_not_found_with_openai_code(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="missing", prompt="a")
    assert caught.value.body["code"] == "model_not_found"


def test_context_overflow_is_a_400_on_v1(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="fake", prompt="x" * 600, max_tokens=10)
    assert "context" in caught.value.body["message"]


def test_native_routes_keep_their_own_error_shape(http):
    error = http.post("/generate", json={"prompt": "a", "temperature": 3}).json()["error"]
    assert set(error) == {"type", "message", "param"}
    raw = http.post("/v1/completions", content=b"{", headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"type", "message", "param", "code"}
    assert json.loads(raw.text)["error"]["code"] is None


def test_one_request_cannot_ask_for_more_than_the_request_cap(client):
    """4 prompts x n=4 x 4096 tokens would be 65536 new tokens from one request."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="fake", prompt=["a", "b", "c", "d"], n=4, max_tokens=4096)
    assert caught.value.body["param"] == "max_tokens"
    assert "asks for 65536 new tokens; one request may ask for at most 16384" in caught.value.body["message"]
    allowed = client.completions.create(model="fake", prompt=["a", "b"], n=2, max_tokens=3)
    assert len(allowed.choices) == 4


def test_a_chat_has_at_most_1024_messages(client):
    many = [{"role": "user", "content": "a"}] * 1025
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake", messages=many, max_tokens=2)
    assert caught.value.body["param"] == "messages"
    assert "1024" in caught.value.body["message"]
    # 1024 are accepted by the schema (the fake model's 512-token context then refuses them).
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fake", messages=many[:1024], max_tokens=2)
    assert "context" in caught.value.body["message"]


@pytest.mark.parametrize(
    "response_format, param, message",
    [
        ({"type": "xml"}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
        ({"type": "json_schema"}, "response_format", "exactly when its type is json_schema"),
        ({"type": "text", "json_schema": {"name": "a", "schema": {}}}, "response_format", "exactly when"),
        ({"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}, "response_format.json_schema.name",
         "should match pattern"),
        ({"type": "json_schema", "json_schema": {"name": "big", "schema": {"enum": ["x" * 40_000]}}},
         "response_format", "the limit is 32768"),
    ],
)
def test_a_response_format_that_cannot_be_served_is_a_400_naming_it(client, response_format, param, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "x"}], response_format=response_format
        )
    assert caught.value.body["param"] == param and message in caught.value.body["message"]


def test_usage_says_how_many_prompt_tokens_came_from_the_prefix_cache(client):
    """The fake engine reports the characters shared with its previous prompt; each
    route says them, streamed (at the end, and with continuous usage) or not."""
    first = client.completions.create(model="fake", prompt="zq", max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model="fake", prompt="zq and more", max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens == 2
    stream = client.completions.create(
        model="fake", prompt="zq and less", max_tokens=3, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # vLLM's extension: usage on every chunk
    )
    usages = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert {usage.prompt_tokens_details.cached_tokens for usage in usages} == {7}
    chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "zq"}], max_tokens=2)
    chat_again = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "zq!"}], max_tokens=2)
    assert chat.usage.prompt_tokens_details.cached_tokens == 0
    assert chat_again.usage.prompt_tokens_details.cached_tokens == len("user: zq")


def test_echo_scores_come_back_in_openais_legacy_shape(client):
    """The HTTP side of prompt scoring (the fake engine scores each character 0.0): the
    prompt's tokens first, the first without a log probability, then the completion's."""
    scored = client.completions.create(model="fake", prompt=[72, 105], echo=True, logprobs=0, max_tokens=0)
    choice = scored.choices[0]
    assert choice.text == "Hi" and choice.finish_reason == "length"
    assert choice.logprobs.tokens == ["H", "i"] and choice.logprobs.token_logprobs == [None, 0.0]
    assert choice.logprobs.top_logprobs == [None, {}] and choice.logprobs.text_offset == [0, 1]
    assert scored.usage.prompt_tokens == 2 and scored.usage.completion_tokens == 0
    both = client.completions.create(model="fake", prompt=[[72], [105, 33]], echo=True, max_tokens=2)
    assert [c.text[: len(p)] for c, p in zip(both.choices, ["H", "i!"], strict=True)] == ["H", "i!"]


@pytest.mark.parametrize("prompt", ["Hi", [72, 105]])
def test_a_stream_echoes_the_prompt_and_its_scores_first_in_each_choice(client, prompt):
    """vLLM's streamed echo: each choice's first chunk holds the prompt's text (the text
    of token ids) and, with logprobs, the prompt's tokens; the stream joins to what the
    same request answers whole."""
    whole = client.completions.create(model="fake", prompt=prompt, echo=True, logprobs=0, max_tokens=3, n=2, seed=1)
    chunks = [chunk.choices[0] for chunk in client.completions.create(
        model="fake", prompt=prompt, echo=True, logprobs=0, max_tokens=3, n=2, seed=1, stream=True)]
    for index in (0, 1):
        mine = [c for c in chunks if c.index == index]
        assert mine[0].text.startswith("Hi") and mine[0].logprobs.tokens[:2] == ["H", "i"]
        assert mine[0].logprobs.token_logprobs[0] is None
        joined = {"text": "".join(c.text for c in mine), "tokens": sum((c.logprobs.tokens for c in mine), []),
                  "text_offset": sum((c.logprobs.text_offset for c in mine), [])}
        expected = whole.choices[index]
        assert joined == {"text": expected.text, "tokens": expected.logprobs.tokens,
                          "text_offset": expected.logprobs.text_offset}
    scored_only = [chunk.choices[0] for chunk in client.completions.create(
        model="fake", prompt=prompt, echo=True, logprobs=0, max_tokens=0, stream=True)]
    assert [(c.text, c.finish_reason) for c in scored_only] == [("Hi", "length")]
    assert scored_only[0].logprobs.token_logprobs == [None, 0.0]
