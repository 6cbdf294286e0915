"""Streaming and the OpenAI API on the live service (tiny model): SSE framing, multi-byte
text, the `openai` client, and a client that leaves mid-stream."""

import asyncio
import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration


def sse_events(raw: str) -> list:
    blocks = raw.strip().split("\n\n")
    assert all(block.startswith("data: ") for block in blocks), "every SSE event is one data line"
    events = [block.removeprefix("data: ") for block in blocks]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_streamed_text_has_no_broken_characters_and_matches_the_whole(tiny_url):
    # The random tiny model writes byte-level tokens freely; the embedded model's emoji
    # are checked in test_serve_run.
    body = {"prompt": "Ünïcödé 日本 🙂", "max_new_tokens": 120, "temperature": 0}
    whole = httpx.post(f"{tiny_url}/generate", json=body, timeout=60).json()
    with httpx.stream("POST", f"{tiny_url}/generate", json={**body, "stream": True}, timeout=60) as response:
        events = sse_events(response.read().decode("utf-8"))
    assert any(ord(character) > 127 for character in whole["text"]), "the test needs multi-byte output"
    assert "".join(event["text"] for event in events) == whole["text"]
    # A delta that cut a character in two would carry U+FFFD that the whole text has not.
    # (A random model can write byte sequences that are invalid UTF-8 for good; those
    # decode to U+FFFD in the whole text too.)
    assert sum(event["text"].count("\ufffd") for event in events) == whole["text"].count("\ufffd")
    assert events[-1]["usage"] == whole["usage"]


@pytest.fixture
def openai_client(tiny_url):
    with openai.OpenAI(base_url=f"{tiny_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_openai_client_sync_completion_and_models(openai_client):
    assert [m.id for m in openai_client.models.list().data] == ["tiny"]
    completion = openai_client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
    streamed = openai_client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text


def test_openai_client_async_chat_streaming_and_not(tiny_url):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{tiny_url}/v1", api_key="unused", max_retries=0) as client:
            messages = [{"role": "user", "content": "Say something"}]
            whole = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
            stream = await client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            return whole, chunks

    whole, chunks = asyncio.run(run())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_openai_client_bad_request(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_p=2)
    assert caught.value.body["param"] == "top_p"


def completion_tokens_counted(metrics_url: str, model: str) -> float:
    total = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_textgen_completion_tokens_total{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled_count(metrics_url: str, model: str) -> float:
    """The counter once it has stopped moving (Ray reports every second here)."""
    previous = None
    for _ in range(30):
        time.sleep(1.5)
        current = completion_tokens_counted(metrics_url, model)
        if current == previous:
            return current
        previous = current
    raise AssertionError("the completion token counter never settled")


def test_a_client_that_leaves_mid_stream_stops_its_generation(tiny_url, cluster):
    before = settled_count(cluster.metrics_url, "tiny")
    body = {"prompt": "Go on", "max_new_tokens": 240, "temperature": 0, "stream": True}
    received = 0
    with httpx.stream("POST", f"{tiny_url}/generate", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                received += 1
                if received == 3:
                    break  # leaving the block closes the connection
    generated = settled_count(cluster.metrics_url, "tiny") - before
    print(f"tokens generated for a stream left after 3 events: {generated:.0f} of 240")
    assert received == 3
    assert generated < 120, f"{generated} of 240 tokens were generated after the client left"


def test_log_probabilities_on_every_api_streamed_or_not_agree(tiny_url, openai_client):
    """The tiny model, greedy: /generate, /v1/completions and /v1/chat/completions give
    each generated token's log probability and the likeliest alternatives, whole or
    streamed, in their own shapes (values checked against a forward pass in
    tests/unit/test_transformers_engine.py)."""
    body = {"prompt": "Hello there", "max_new_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = httpx.post(f"{tiny_url}/generate", json=body, timeout=60).json()
    scored = whole["generations"][0]["logprobs"]
    assert len(scored) == whole["usage"]["completion_tokens"] == 6
    assert all(len(entry["top_logprobs"]) == 2 and entry["logprob"] <= entry["top_logprobs"][0]["logprob"] + 1e-6
               for entry in scored), "greedy picks the likeliest (top first)"
    with httpx.stream("POST", f"{tiny_url}/generate", json={**body, "stream": True}, timeout=60) as response:
        events = sse_events(response.read().decode("utf-8"))
    assert [entry for event in events for entry in event["logprobs"]] == scored
    plain = httpx.post(f"{tiny_url}/generate", json={**body, "logprobs": None}, timeout=60).json()
    assert "logprobs" not in plain["generations"][0], "only when asked for"

    completion = openai_client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0,
                                                  logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.token_logprobs == [entry["logprob"] for entry in scored]
    assert logprobs.tokens == [entry["token"] for entry in scored]
    assert [len(top) for top in logprobs.top_logprobs] == [2] * 6
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])
    streamed = openai_client.completions.create(model="tiny", prompt="Hello there", max_tokens=6, temperature=0,
                                                logprobs=2, stream=True)
    chunks = [chunk.choices[0].logprobs for chunk in streamed if chunk.choices[0].logprobs]
    assert [value for chunk in chunks for value in chunk.token_logprobs] == logprobs.token_logprobs
    assert [offset for chunk in chunks for offset in chunk.text_offset] == logprobs.text_offset

    messages = [{"role": "user", "content": "Hello there"}]
    chat = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) <= chat.usage.completion_tokens and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.bytes == list(entry.token.encode()) for entry in content)
    streamed_chat = openai_client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                          logprobs=True, top_logprobs=3, stream=True)
    streamed_content = [entry for chunk in streamed_chat if chunk.choices and chunk.choices[0].logprobs
                        for entry in chunk.choices[0].logprobs.content]
    assert [entry.logprob for entry in streamed_content] == [entry.logprob for entry in content]
