"""The HTTP side without Ray: the FastAPI app over a fake model handle."""

import asyncio
import logging
import re
import json

import httpx
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
    # vLLM's probes: an empty 200.
    for response in (client.get("/health"), client.get("/ping"), client.post("/ping")):
        assert response.status_code == 200 and response.content == b""
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


def test_readiness_is_503_while_an_engine_is_broken():
    broken = FakeEngine(ModelConfig(name="fake", source=fake_source(broken=True)), "cpu")
    app = create_api(make_ingress({"fake": FakeModelHandle(broken)}), NO_LIMITS)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["models"] == {"fake": None}


def guarded_client(**limits):
    from serve_app.args import IngressArgs

    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    ingress = Ingress({"fake": FakeModelHandle(engine)}, RateLimitArgs(enabled=False), AuthArgs(), IngressArgs(**limits))
    return TestClient(create_api(ingress, NO_LIMITS), raise_server_exceptions=False)


def test_body_over_the_limit_is_413_and_non_json_is_415():
    with guarded_client(max_request_bytes=2048) as client:
        big = client.post("/generate", json={"prompt": "x" * 5000})
        assert big.status_code == 413 and "2048 bytes" in big.json()["error"]["message"]
        chunked = client.post(
            "/generate", content=iter([b'{"prompt": "', b"x" * 3000, b'"}']), headers={"Content-Type": "application/json"}
        )
        assert chunked.status_code == 413, "a body without Content-Length is counted as it arrives"
        form = client.post("/generate", content=b"prompt=hi", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]
        untyped = client.post("/generate", content=b'{"prompt": "hi"}')
        assert untyped.status_code == 415 and "no Content-Type" in untyped.json()["error"]["message"]
        assert client.post("/v1/completions", content=b"x", headers={"Content-Type": "text/plain"}).json()["error"]["code"] is None


def test_prompt_longer_than_the_character_limit_is_422():
    with guarded_client(max_prompt_chars=100) as client:
        response = client.post("/generate", json={"prompt": "y" * 101})
        assert response.status_code == 422 and response.json()["error"]["param"] == "prompt"
        assert "101 characters; the limit is 100" in response.json()["error"]["message"]
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "z" * 101}]})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"


def test_request_timeout_header_is_checked():
    with guarded_client(request_timeout_s=30, max_request_timeout_s=60) as client:
        for value in ("0", "-1", "soon", "61"):
            response = client.post("/generate", json={"prompt": "a"}, headers={"X-Request-Timeout": value})
            assert response.status_code == 422, value
            assert response.json()["error"]["param"] == "X-Request-Timeout"
        assert client.post("/generate", json={"prompt": "a", "max_new_tokens": 2}, headers={"X-Request-Timeout": "5"}).status_code == 200


def test_control_characters_and_unicode_are_served():
    with guarded_client() as client:
        response = client.post("/generate", json={"prompt": "nul\x00 bell\x07 ü 日本 🙂", "max_new_tokens": 3})
        assert response.status_code == 200


def test_lone_surrogates_are_a_client_error_everywhere():
    with guarded_client() as client:
        raw = '{"prompt": "a\\ud800b"}'
        for path in ("/generate", "/v1/completions"):
            response = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
            assert response.status_code in (400, 422), path
        chat = '{"messages": [{"role": "user", "content": "\\udfff"}]}'
        assert client.post("/v1/chat/completions", content=chat.encode(), headers={"Content-Type": "application/json"}).status_code == 400


def test_a_slow_generation_past_its_deadline_is_504():
    slow = FakeEngine(ModelConfig(name="fake", source=fake_source(step_s=0.05)), "cpu")
    app = create_api(make_ingress({"fake": FakeModelHandle(slow)}), NO_LIMITS)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/generate", json={"prompt": "a", "max_new_tokens": 100}, headers={"X-Request-Timeout": "0.3"})
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"
        with client.stream(
            "POST", "/generate", json={"prompt": "a", "max_new_tokens": 100, "stream": True},
            headers={"X-Request-Timeout": "0.3"},
        ) as stream:
            events = stream.read().decode().strip().split("\n\n")
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "timeout_error"


def test_probes_share_one_readiness_check_per_second():
    class Counting(FakeModelHandle):
        calls = 0

        async def _status(self):
            Counting.calls += 1
            await asyncio.sleep(0.2)  # probes arriving meanwhile join this check
            return await super()._status()

    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    app = create_api(make_ingress({"fake": Counting(engine)}), NO_LIMITS)

    async def probes():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = await asyncio.gather(*(client.get("/readyz") for _ in range(20)))
            again = await client.get("/readyz")  # within the second: the same answer
            await asyncio.sleep(1.1)
            later = await client.get("/readyz")
            return first, again, later

    first, again, later = asyncio.run(probes())
    assert {r.status_code for r in [*first, again, later]} == {200}
    assert Counting.calls == 2, "one check for the 21 probes of the first second, one after"


def test_probes_answer_and_count_nothing_when_the_ingress_is_full():
    """A slow readiness check does not take the ingress's one request slot, and a full
    ingress still answers its probes."""
    from serve_app.args import IngressArgs

    class SlowStatus(FakeModelHandle):
        async def _status(self):
            await asyncio.sleep(0.5)
            return await super()._status()

    engine = FakeEngine(ModelConfig(name="fake", source=fake_source(step_s=0.05)), "cpu")
    ingress = Ingress({"fake": SlowStatus(engine)}, RateLimitArgs(enabled=False), AuthArgs(),
                      IngressArgs(max_ongoing_requests=1))
    app = create_api(ingress, NO_LIMITS)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            probe = asyncio.ensure_future(client.get("/readyz"))
            await asyncio.sleep(0.1)  # the probe waits for the model's status
            busy = asyncio.ensure_future(client.post("/generate", json={"prompt": "a", "max_new_tokens": 20}))
            await asyncio.sleep(0.2)  # now the one request slot is taken
            shed = await client.post("/generate", json={"prompt": "b", "max_new_tokens": 1})
            healthy = await client.get("/healthz")
            return (await probe).status_code, (await busy).status_code, shed.status_code, healthy.status_code

    assert asyncio.run(scenario()) == (200, 200, 503, 200)


def test_a_request_id_that_is_not_sane_is_refused_naming_the_header(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123:x.y_z"}).status_code == 200
    for bad in ("x" * 129, "has space", "new\\line"):
        refused = client.post("/generate", json={"prompt": "a"}, headers={"X-Request-ID": bad})
        assert refused.status_code == 422
        assert refused.json()["error"]["param"] == "X-Request-ID"
        openai_style = client.post("/v1/completions", json={"model": "fake", "prompt": "a"},
                                   headers={"X-Request-ID": bad})
        assert openai_style.status_code == 400 and openai_style.json()["error"]["param"] == "X-Request-ID"


def test_a_body_that_trickles_in_gets_408():
    from serve_app.guards import RequestGuardMiddleware

    async def never_called(scope, receive, send):
        raise AssertionError("the route must not run")

    guard = RequestGuardMiddleware(never_called, max_concurrent=4, max_body_bytes=1 << 20, body_read_timeout_s=0.2)
    sent = []

    async def scenario():
        async def receive():
            await asyncio.sleep(0.1)  # 10 bytes every 0.1 s: it would take forever
            return {"type": "http.request", "body": b"0123456789", "more_body": True}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/generate", "root_path": "", "headers": [
            (b"content-type", b"application/json")]}
        await guard(scope, receive, send)

    asyncio.run(scenario())
    assert sent[0]["status"] == 408
    assert b"did not arrive within 0.2 s" in sent[1]["body"]
    assert guard.in_flight == 0


def test_an_empty_body_names_the_missing_field(client):
    empty = client.post("/generate", content=b"", headers={"Content-Type": "application/json"})
    assert empty.status_code == 422
    assert empty.json()["error"]["param"] == "prompt"
    assert "no body" in empty.json()["error"]["message"]
    chat = client.post("/v1/chat/completions", content=b"", headers={"Content-Type": "application/json"})
    assert chat.status_code == 400 and chat.json()["error"]["param"] in {"model", "messages"}


def test_schema_pages_have_their_own_route_label():
    from serve_app.request_context import route_label

    scope = {"type": "http", "path": "/docs", "root_path": ""}
    assert route_label(scope) == "/docs"
    assert route_label({**scope, "path": "/openapi.json"}) == "/openapi.json"
    assert route_label({**scope, "path": "/nope"}) == "unmatched"


def test_the_body_id_is_the_request_id(client):
    response = client.post("/generate", json={"prompt": "a", "max_new_tokens": 1}, headers={"X-Request-ID": "one-id-1"})
    assert response.json()["id"] == "one-id-1"
    completion = client.post("/v1/completions", json={"model": "fake", "prompt": "a", "max_tokens": 1},
                             headers={"X-Request-ID": "one-id-2"})
    assert completion.json()["id"] == "cmpl-one-id-2"


def test_a_client_error_is_one_info_line_with_its_id_and_reason(client, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    for path, body, status in [
        ("/generate", {"prompt": "Hi", "temperature": 3}, 422),
        ("/v1/completions", {"model": "nope", "prompt": "Hi"}, 404),
    ]:
        caplog.clear()
        response = client.post(path, json=body, headers={"X-Request-ID": f"bad-{status}"})
        assert response.status_code == status
        [record] = [r for r in caplog.records if f"bad-{status}" in r.getMessage()]
        assert record.levelno == logging.INFO and record.exc_info is None
        message = response.json()["error"]["message"]
        assert re.search(rf"status={status} .* error={re.escape(json.dumps(message))}$", record.getMessage())
    caplog.clear()
    client.post("/generate", json={"prompt": "abc", "max_new_tokens": 2}, headers={"X-Request-ID": "fine"})
    [record] = [r for r in caplog.records if "request_id=fine " in r.getMessage()]
    assert "error=" not in record.getMessage()


def test_an_adapter_that_failed_to_load_is_a_500_naming_it_plain_and_streamed():
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source(failing=True)), "cpu")
    engine.load()
    ingress = make_ingress({"fake": FakeModelHandle(engine)})
    with TestClient(create_api(ingress, NO_LIMITS), raise_server_exceptions=False) as client:
        plain = client.post("/generate", json={"prompt": "!a", "max_new_tokens": 2})
        assert plain.status_code == 500 and plain.json()["error"]["param"] == "model"
        assert plain.json()["error"]["message"] == "adapter broken could not be loaded: its weights could not be read"
        streamed = client.post("/v1/completions", json={"model": "fake", "prompt": "!a", "max_tokens": 2, "stream": True})
        events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["error"]["message"].startswith("adapter broken could not be loaded")
        assert streamed.text.rstrip().endswith("data: [DONE]")


def test_a_path_cannot_forge_a_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    response = client.get("/x%0Drequest_id=forged%0Amethod=GET%20path=/generate", headers={"X-Request-ID": "forger"})
    assert response.status_code == 404
    [record] = [r for r in caplog.records if "request_id=forger " in r.getMessage()]
    message = record.getMessage()
    assert "\n" not in message and "\r" not in message
    assert "path=/x%0Drequest_id=forged%0Amethod=GET%20path=/generate status=404" in message
    assert not any("request_id=forged" in r.getMessage() and r is not record for r in caplog.records)


WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def test_tokenize_and_detokenize_in_vllms_shapes(client):
    prompt = client.post("/tokenize", json={"prompt": "abc"})
    assert prompt.status_code == 200
    assert prompt.json() == {"count": 3, "max_model_len": FAKE_CONTEXT_LENGTH, "tokens": [97, 98, 99]}
    chat = client.post("/tokenize", json={"messages": [{"role": "developer", "content": "hi"}], "model": "other"})
    assert chat.json()["tokens"] == [ord(c) for c in "system: hi\n"], "developer is the system role to a template"
    unset = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}], "tools": None})
    assert unset.status_code == 200, "tools: null is no tools (clients send it)"
    back = client.post("/detokenize", json={"tokens": [104, 105]})
    assert back.status_code == 200 and back.json() == {"prompt": "hi"}
    for path, body, status, param in [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422, "prompt"),
        ("/tokenize", {}, 422, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
        ("/tokenize", {"prompt": "a", "tools": [WEATHER_TOOL]}, 422, "tools"),
        ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "tools": [WEATHER_TOOL, WEATHER_TOOL]},
         422, "tools[1].function.name"),
        ("/tokenize", {"messages": [{"role": "user", "content": "b"}],
                       "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
         422, "tools[0].function.parameters"),
        ("/detokenize", {"tokens": [-1]}, 422, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, 422, "tokens.0"),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == status and response.json()["error"]["param"] == param, (body, response.text)


def test_adapters_are_models_named_after_their_base():
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    ingress = Ingress({"fake": FakeModelHandle(engine)}, RateLimitArgs(enabled=False), AuthArgs(),
                      adapters={"fake": ("terse", "chatty")})
    with TestClient(create_api(ingress, NO_LIMITS), raise_server_exceptions=False) as client:
        listed = client.get("/v1/models").json()["data"]
        assert [(card["id"], card["parent"]) for card in listed] == [
            ("fake", None), ("fake:terse", "fake"), ("fake:chatty", "fake")
        ]
        assert client.get("/v1/models/fake:terse").json()["parent"] == "fake"
        for name in ("fake:terse", "chatty"):
            assert client.post("/generate", json={"prompt": "a", "max_new_tokens": 2, "model": name}).status_code == 200
        unknown = client.post("/generate", json={"prompt": "a", "model": "fake:nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
        assert "'fake:nope' does not exist; available: fake, fake:terse, fake:chatty" in unknown.json()["error"]["message"]


def test_a_model_name_may_hold_colons_and_still_have_adapters():
    engine = FakeEngine(ModelConfig(name="llama3:8b", source=fake_source()), "cpu")
    ingress = Ingress({"llama3:8b": FakeModelHandle(engine)}, RateLimitArgs(enabled=False), AuthArgs(),
                      adapters={"llama3:8b": ("terse",)})
    with TestClient(create_api(ingress, NO_LIMITS), raise_server_exceptions=False) as client:
        for name in ("llama3:8b", "llama3:8b:terse", "terse"):
            assert client.post("/generate", json={"prompt": "a", "max_new_tokens": 1, "model": name}).status_code == 200
        assert client.post("/generate", json={"prompt": "a", "model": "llama3"}).status_code == 404
        assert client.post("/generate", json={"prompt": "a", "model": "llama3:8b:nope"}).status_code == 404


def test_version_and_tokenizer_info(client):
    version = client.get("/version")
    assert version.status_code == 200 and version.json()["version"] not in ("", None)
    info = client.get("/tokenizer_info")
    assert info.status_code == 200 and info.json()["tokenizer_class"] == "FakeCharacterTokenizer"
    assert client.get("/tokenizer_info", params={"model": "nope"}).status_code == 404
