"""The HTTP side without Ray: the FastAPI app over a fake model handle."""

import json

import pytest
from fastapi.testclient import TestClient

from deployments.config import ModelConfig
from serve_app.access import AccessControl
from serve_app.args import AuthArgs, RateLimitArgs
from serve_app.ingress import Ingress, create_api
from serve_app.rate_limit import Quota
from tests.fakes import FAKE_CONTEXT_LENGTH, FakeEngine, FakeModelHandle, fake_source, fake_text


NO_LIMITS = AccessControl(limiter=None, default_quota=Quota())


def make_ingress(handles) -> Ingress:
    return Ingress(handles, RateLimitArgs(enabled=False), AuthArgs())


@pytest.fixture
def client():
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    engine.load()
    other = FakeEngine(ModelConfig(name="other", source=fake_source()), "cpu")
    ingress = make_ingress({"fake": FakeModelHandle(engine), "other": FakeModelHandle(other)})
    with TestClient(create_api(ingress, NO_LIMITS), raise_server_exceptions=False) as test_client:
        yield test_client


def test_generate_returns_the_contract(client):
    response = client.post("/generate", json={"prompt": "abc", "max_new_tokens": 5})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "model", "text", "finish_reason", "usage", "generations", "latency_ms"}
    assert body["model"] == "fake"
    assert body["text"] == fake_text(None, 0, 5)
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert body["generations"] == [{"text": body["text"], "finish_reason": "length", "completion_tokens": 5}]
    assert response.headers["X-Request-ID"]


def test_usage_counts_every_sequence(client):
    body = client.post(
        "/generate", json={"prompt": "ab", "max_new_tokens": 4, "num_return_sequences": 3, "seed": 1}
    ).json()
    assert [g["text"] for g in body["generations"]] == [fake_text(1, i, 4) for i in range(3)]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}


def test_stop_sequence_gives_finish_reason_stop(client):
    body = client.post("/generate", json={"prompt": "a", "max_new_tokens": 30, "stop": ["fox"]}).json()
    assert body["text"] == "The quick brown "
    assert body["finish_reason"] == "stop"


def test_routes_by_model_and_unknown_model_is_404(client):
    assert client.post("/generate", json={"prompt": "a", "model": "other", "max_new_tokens": 1}).json()["model"] == "other"
    response = client.post("/generate", json={"prompt": "a", "model": "nope"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "type": "not_found_error",
        "message": "model 'nope' does not exist; available: fake, other",
        "param": "model",
    }


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "a", "temperature": 5}, "temperature"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "a", "stop": ["ok", ""]}, "stop.1"),
        ({"prompt": "a", "bogus": True}, "bogus"),
        ({"temperature": 1}, "prompt"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, body, param):
    response = client.post("/generate", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split(".")[0] in error["message"]


def test_context_overflow_from_the_model_is_422_with_both_numbers(client):
    response = client.post("/generate", json={"prompt": "x" * 500, "max_new_tokens": 100})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "max_new_tokens"
    assert "500 tokens" in error["message"] and "100 new tokens" in error["message"]
    assert f"context of {FAKE_CONTEXT_LENGTH}" in error["message"]


def test_invalid_json_is_400(client):
    response = client.post("/generate", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_unknown_route_is_json_404(client):
    response = client.get("/nope")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"]["fake"] == {
        "name": "fake", "context_length": FAKE_CONTEXT_LENGTH, "device": "cpu", "dtype": "fake"
    }


def parse_sse(text: str) -> list:
    assert text.endswith("\n\n")
    events = [block.removeprefix("data: ") for block in text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_stream_frames_deltas_then_finish_and_usage(client):
    with client.stream("POST", "/generate", json={"prompt": "ab", "max_new_tokens": 6, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.read().decode())
    assert "".join(e["text"] for e in events) == fake_text(None, 0, 6)
    assert all(set(e) >= {"id", "model", "index", "text"} for e in events)
    assert len({e["id"] for e in events}) == 1
    assert "finish_reason" not in events[0]
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}


def test_stream_rejected_request_gets_a_real_status_code(client):
    response = client.post("/generate", json={"prompt": "x" * 600, "stream": True})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"


def test_unexpected_error_is_a_masked_500_with_request_id(client):
    class Broken(FakeModelHandle):
        async def _generate(self, params):
            raise RuntimeError("secret internal detail")

    broken_engine = FakeEngine(ModelConfig(source=fake_source()), "cpu")
    app = create_api(make_ingress({"m": Broken(broken_engine)}), NO_LIMITS)
    with TestClient(app, raise_server_exceptions=False) as broken_client:
        response = broken_client.post("/generate", json={"prompt": "a"})
    assert response.status_code == 500
    request_id = response.headers["X-Request-ID"]
    assert response.json()["error"]["message"] == f"internal error; quote request id {request_id}"
    assert "secret" not in response.text
