"""Promises of the limits that only Serve's HTTP proxy can show: a trickling body gets
408, a client's concurrency cap holds, and a streamed client that leaves is charged
only what it generated, each through `serve.run` with the real engine."""

import asyncio
import socket
import time

import httpx
import pytest
from ray import serve

from serve_app.args import AppArgs, IngressArgs, ModelArgs, QuotaArgs, RateLimitArgs
from tests.integration.conftest import deploy

pytestmark = pytest.mark.integration

TOKEN_QUOTA = 300  # a 200-token request for prompt "a" reserves 1 + 16 + 200 = 217 of it


@pytest.fixture(scope="module")
def limited_url(serve_base_url, tiny_model_dir):
    args = AppArgs(
        models=[ModelArgs(name="tiny", source=str(tiny_model_dir), num_cpus=0.1, num_replicas=1, autoscaling=None,
                          stream_interval_s=0)],
        # One ingress replica: the concurrency cap is counted per replica.
        ingress=IngressArgs(num_replicas=1, num_cpus=0.1, body_read_timeout_s=1),
        rate_limits=RateLimitArgs(
            default=QuotaArgs(tokens=[f"{TOKEN_QUOTA}/minute"]), max_concurrent_per_client=1,
            trusted_proxies=["127.0.0.1/32"],
        ),
    )
    url = deploy(serve_base_url, args, "limited")
    yield url
    serve.delete("limited")


def client(address: str) -> dict:
    return {"X-Forwarded-For": address}  # 127.0.0.1 is a trusted proxy here


def test_a_body_that_trickles_in_gets_408_through_the_proxy(limited_url):
    host, port = httpx.URL(limited_url).host, httpx.URL(limited_url).port
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(
            b"POST /limited/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\nX-Forwarded-For: 192.0.2.40\r\n\r\n{\"prompt\": "
        )  # and nothing more
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(4096)
            assert chunk, "the connection closed without an answer"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_a_clients_concurrency_cap_holds_through_the_proxy(limited_url):
    async def scenario():
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"prompt": "a", "max_new_tokens": 40, "stream": True}
            async with http.stream("POST", f"{limited_url}/generate", json=body,
                                   headers=client("192.0.2.41")) as held:
                lines = held.aiter_lines()
                await anext(lines)  # its first event: it is in flight
                same = await http.post(f"{limited_url}/generate", json={"prompt": "a", "max_new_tokens": 1},
                                       headers=client("192.0.2.41"))
                other = await http.post(f"{limited_url}/generate", json={"prompt": "a", "max_new_tokens": 1},
                                        headers=client("192.0.2.42"))
                [line async for line in lines]
            after = await http.post(f"{limited_url}/generate", json={"prompt": "a", "max_new_tokens": 1},
                                    headers=client("192.0.2.41"))
            return same, other, after

    same, other, after = asyncio.run(scenario())
    assert same.status_code == 429 and "1 requests in flight" in same.json()["error"]["message"]
    assert same.headers["Retry-After"] == "1"
    assert other.status_code == 200 and after.status_code == 200, "the slot is given back at the end"


def test_a_streamed_client_that_leaves_is_charged_only_what_it_generated(limited_url):
    """It reserved 217 of 300 tokens and left after a few; had the reservation been kept,
    a second such request would not fit (217 + 217 > 300)."""
    body = {"model": "tiny", "prompt": "a", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{limited_url}/v1/completions", json=body, headers=client("192.0.2.43")) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    break  # leave at the first tokens
        deadline = time.monotonic() + 20
        while True:  # the ingress settles once Serve tells it the client left
            again = http.post(f"{limited_url}/v1/completions", json={**body, "stream": False},
                              headers=client("192.0.2.43"))
            if again.status_code != 429 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert again.status_code == 200, again.text
    assert again.json()["usage"]["completion_tokens"] == 200


@pytest.fixture(scope="module")
def two_models_url(serve_base_url, tiny_model_dir):
    models = [
        ModelArgs(name=name, source=str(tiny_model_dir), num_cpus=0.1, num_replicas=1, autoscaling=None)
        for name in ("first", "second")
    ]
    url = deploy(serve_base_url, AppArgs(models=models, ingress=IngressArgs(num_replicas=1, num_cpus=0.1),
                                         rate_limits=RateLimitArgs(enabled=False)), "two-models")
    yield url
    serve.delete("two-models")


def test_an_app_with_two_models_routes_by_name_and_lists_both(two_models_url):
    with httpx.Client(timeout=60) as http:
        listed = http.get(f"{two_models_url}/v1/models").json()["data"]
        ready = http.get(f"{two_models_url}/readyz")
        answers = {
            name: http.post(f"{two_models_url}/v1/completions", json={"model": name, "prompt": "a", "max_tokens": 1})
            for name in ("first", "second")
        }
        default = http.post(f"{two_models_url}/generate", json={"prompt": "a", "max_new_tokens": 1})
        unknown = http.post(f"{two_models_url}/generate", json={"prompt": "a", "model": "third"})
    assert [card["id"] for card in listed] == ["first", "second"]
    assert ready.status_code == 200 and set(ready.json()["models"]) == {"first", "second"}
    assert {name: answer.json()["model"] for name, answer in answers.items()} == {"first": "first", "second": "second"}
    assert default.status_code == 200 and default.json()["model"] == "first", "the first model is the default"
    assert unknown.status_code == 404 and "first, second" in unknown.json()["error"]["message"]


def test_each_request_reaches_the_model_replica_as_its_clients_tenant(limited_url, cluster):
    """The tenant whose share of the batch a request takes arrives with it through Serve
    (the model replica's log line names it: the client's address here, keys being off)."""
    answer = httpx.post(f"{limited_url}/generate", json={"prompt": "a", "max_new_tokens": 1}, timeout=60,
                        headers={**client("192.0.2.44"), "X-Request-ID": "tenant-check"})
    assert answer.status_code == 200
    deadline = time.monotonic() + 30
    while True:
        lines = [line for log in (cluster.session_dir / "logs" / "serve").glob("replica_limited_Model-tiny_*.log")
                 for line in log.read_text(errors="replace").splitlines() if "request_id=tenant-check " in line]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert lines and "tenant=ip:192.0.2.44 " in lines[0], lines
