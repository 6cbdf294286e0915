"""The serving graph over HTTP: real Ray + Serve on 127.0.0.1, the tiny model."""

import time
import asyncio
import json

import httpx
import pytest
from ray import serve
from transformers import AutoTokenizer

from serve_app.args import AppArgs, IngressArgs, ModelArgs, RateLimitArgs
from tests.fakes import FAKE_ENGINE, fake_source
from tests.integration.conftest import deploy_in_background, wait_for_status
from tests.tiny_model import TINY_CONTEXT_LENGTH

pytestmark = pytest.mark.integration


def post(url, body, **kwargs):
    return httpx.post(f"{url}/generate", json=body, timeout=60, **kwargs)


def test_generate_200_with_exact_token_counts(tiny_url, tiny_model_dir):
    prompt = "The capital of France is"
    response = post(tiny_url, {"prompt": prompt, "max_new_tokens": 7, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir)(prompt)["input_ids"])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7}
    assert body["model"] == "tiny" and body["finish_reason"] == "length" and body["text"]
    assert body["latency_ms"] > 0


def test_a_request_id_that_is_not_sane_is_refused_through_the_proxy(tiny_url):
    for bad in ("x" * 300, "two words"):
        response = post(tiny_url, {"prompt": "hi", "max_new_tokens": 1}, headers={"X-Request-ID": bad})
        assert response.status_code == 422 and response.json()["error"]["param"] == "X-Request-ID"
        assert response.headers.get_list("X-Request-ID") == [bad], "Serve's proxy echoes it, once"


def test_request_id_is_echoed_once(tiny_url):
    response = post(tiny_url, {"prompt": "hi", "max_new_tokens": 1}, headers={"X-Request-ID": "client-id-42"})
    assert response.headers.get_list("x-request-id") == ["client-id-42"]
    generated = post(tiny_url, {"prompt": "hi", "max_new_tokens": 1})
    assert len(generated.headers.get_list("x-request-id")) == 1


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
        ({"prompt": "hi", "max_new_tokens": 5, "max_length": 9}, 422, "max_length"),
        ({"prompt": "hi", "extra": 1}, 422, "extra"),
        ({"prompt": "hi", "model": "missing"}, 404, "model"),
        ({"prompt": "hi", "max_length": 1}, 422, "max_length"),
    ],
)
def test_client_errors(tiny_url, body, status, param):
    response = post(tiny_url, body)
    assert response.status_code == status
    assert response.json()["error"]["param"] == param


def test_oversized_and_non_json_bodies_through_serves_proxy(tiny_url):
    """413 and 415 come back through Serve's HTTP proxy as they do in-process, also for a
    chunked body (no Content-Length) and on /v1 (OpenAI's error shape)."""
    big = b'{"prompt": "' + b"x" * (1 << 20) + b'"}'
    sized = httpx.post(f"{tiny_url}/generate", content=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert sized.status_code == 413 and sized.json()["error"]["type"] == "request_too_large"

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    chunked = httpx.post(f"{tiny_url}/v1/completions", content=chunks(),
                         headers={"Content-Type": "application/json"}, timeout=60)
    assert chunked.status_code == 413 and set(chunked.json()["error"]) == {"type", "message", "param", "code"}
    text = httpx.post(f"{tiny_url}/generate", content=b"prompt=hi", headers={"Content-Type": "text/plain"}, timeout=60)
    assert text.status_code == 415 and "send JSON" in text.json()["error"]["message"]


def test_context_overflow_crosses_the_handle_as_422(tiny_url, tiny_model_dir, cluster):
    prompt = "word " * 200
    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir)(prompt)["input_ids"])
    for stream in (False, True):
        request_id = f"overflow-{int(stream)}"
        response = post(tiny_url, {"prompt": prompt, "max_new_tokens": 100, "stream": stream},
                        headers={"X-Request-ID": request_id})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["param"] == "max_new_tokens"
        assert f"{prompt_tokens} tokens" in error["message"] and "100 new tokens" in error["message"]
        assert f"context of {TINY_CONTEXT_LENGTH} tokens" in error["message"]
        # A client's mistake is one INFO line in the model replica's log, no traceback.
        lines = model_log_lines(cluster, "tiny", request_id)
        assert {line.split()[0] for line in lines} == {"INFO"}, lines
        assert any("refused: prompt has" in line for line in lines)


def model_log_lines(cluster, app: str, request_id: str) -> list[str]:
    """The model replica's log lines tagged with ``request_id`` (Serve tags each)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            line
            for log in (cluster.session_dir / "logs" / "serve").glob(f"replica_{app}_Model-*.log")
            for line in log.read_text(errors="replace").splitlines()
            if f" {request_id} -- " in line
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def test_max_length_counts_the_prompt(tiny_url):
    body = post(tiny_url, {"prompt": "one two three", "max_length": 10, "temperature": 0}).json()
    assert body["usage"]["total_tokens"] == 10


def test_num_return_sequences_and_stop(tiny_url):
    body = post(tiny_url, {"prompt": "hi", "max_new_tokens": 6, "num_return_sequences": 3, "seed": 5}).json()
    assert len(body["generations"]) == 3
    assert body["usage"]["completion_tokens"] == sum(g["completion_tokens"] for g in body["generations"])
    full = post(tiny_url, {"prompt": "Tell me", "max_new_tokens": 20, "temperature": 0}).json()["text"]
    stop = full[8:11]
    stopped = post(tiny_url, {"prompt": "Tell me", "max_new_tokens": 20, "temperature": 0, "stop": [stop]}).json()
    assert stopped["finish_reason"] == "stop" and stopped["text"] == full[: full.index(stop)]


def test_mixed_sampling_parameters_in_one_batch_are_each_honoured(tiny_url):
    """Greedy and seeded requests give the same text alone as in a batch beside others
    sampled with different temperature/top_p/top_k/stop (the 0.3 s batch wait puts
    requests sent together into one batch)."""
    requests = [
        {"prompt": "Greedy one", "max_new_tokens": 12, "temperature": 0},
        {"prompt": "Hot", "max_new_tokens": 16, "temperature": 1.8, "top_k": 20, "seed": 1},
        {"prompt": "Nucleus", "max_new_tokens": 10, "temperature": 0.8, "top_p": 0.3, "seed": 2},
        {"prompt": "Greedy two", "max_new_tokens": 6, "temperature": 0, "repetition_penalty": 1.5},
        {"prompt": "Seeded", "max_new_tokens": 9, "temperature": 1.0, "seed": 3, "num_return_sequences": 2},
    ]

    async def send_together():
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(f"{tiny_url}/generate", json=r) for r in requests))
        return [r.json()["generations"] for r in responses]

    batched = asyncio.run(send_together())
    alone = [post(tiny_url, request).json()["generations"] for request in requests]
    assert batched == alone
    assert [g[0]["completion_tokens"] for g in batched] == [12, 16, 10, 6, 9]


def test_stream_over_serve(tiny_url):
    with httpx.stream(
        "POST", f"{tiny_url}/generate", json={"prompt": "Hi", "max_new_tokens": 5, "temperature": 0, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    events = [block.removeprefix("data: ") for block in raw.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    whole = post(tiny_url, {"prompt": "Hi", "max_new_tokens": 5, "temperature": 0}).json()
    assert "".join(e["text"] for e in parsed) == whole["text"]
    assert parsed[-1]["finish_reason"] == "length" and parsed[-1]["usage"] == whole["usage"]


def test_stream_of_an_invalid_request_is_a_plain_422(tiny_url):
    response = post(tiny_url, {"prompt": "word " * 300, "stream": True})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"


def test_readyz_is_503_until_the_model_has_loaded(serve_base_url):
    args = AppArgs(
        models=[ModelArgs(name="slow", source=fake_source(load_s=8), engine=FAKE_ENGINE,
                          num_cpus=0.25, num_replicas=1, autoscaling=None)],
        ingress=IngressArgs(num_cpus=0.1),
        rate_limits=RateLimitArgs(enabled=False),
    )
    url, deploying = deploy_in_background(serve_base_url, args, "slow")
    try:
        loading = wait_for_status(f"{url}/readyz", 503, timeout_s=60)
        assert loading.json()["models"] == {"slow": None}
        assert loading.headers["Retry-After"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        ready = wait_for_status(f"{url}/readyz", 200, timeout_s=60)
        assert ready.json()["models"]["slow"]["dtype"] == "fake"
    finally:
        deploying.join(timeout=60)
        serve.delete("slow")
