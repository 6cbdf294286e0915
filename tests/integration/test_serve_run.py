"""`serve run configs/serve.yaml` as a user runs it, with the embedded SmolLM2.

The config is copied with only the HTTP port changed (a free one), and Ray is told to
start a cluster of its own (RAY_ADDRESS=local) rather than join the tests' cluster.
"""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.integration.conftest import free_port, wait_for_status

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SERVE = Path(sys.executable).parent / "serve"
CHAT_PROMPT = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-run")
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config_path = folder / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = folder / "serve-run.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(SERVE), "run", str(config_path)],
            cwd=ROOT,
            # Also shows TEXTGEN_RATE_LIMIT reaching the replicas: these tests send more
            # than the config's 10 requests a minute.
            env={**os.environ, "RAY_ADDRESS": "local", "TEXTGEN_RATE_LIMIT": "100/minute"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_status(f"{url}/readyz", 200, timeout_s=240)
        print(f"serve run: first ready after {time.monotonic() - started:.1f} s")
        yield url, log_path
    finally:
        process.send_signal(signal.SIGTERM)  # serve run ignores SIGINT when backgrounded
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_embedded_model_completes_a_fact(served):
    url, _ = served
    response = httpx.post(
        f"{url}/generate",
        json={"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "Paris" in body["text"]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    assert body["finish_reason"] == "length"


def test_embedded_model_answers_in_its_chat_format_and_stops_at_eos(served):
    url, _ = served
    body = httpx.post(
        f"{url}/generate",
        json={"prompt": CHAT_PROMPT, "max_new_tokens": 40, "temperature": 0},
        timeout=60,
    ).json()
    assert body["text"].strip() == "The capital of France is Paris."
    assert body["finish_reason"] == "eos"


@pytest.fixture(scope="module")
def dashboard_address(served):
    _, log_path = served
    match = re.search(r"dashboard at \S*?(\d+\.\d+\.\d+\.\d+:\d+)", log_path.read_text(errors="replace"))
    assert match, "serve run should print the dashboard address"
    return f"http://{match.group(1)}"


def test_serve_status_shows_the_application_running(dashboard_address):
    status = subprocess.run(
        [str(SERVE), "status", "--address", dashboard_address],
        capture_output=True, text=True, timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert "status: RUNNING" in status.stdout
    assert "Model-smollm2-135m-instruct" in status.stdout


def test_dashboard_api_lists_the_application_running(dashboard_address):
    body = httpx.get(f"{dashboard_address}/api/serve/applications/", timeout=30).json()
    application = body["applications"]["textgen"]
    assert application["status"] == "RUNNING"
    deployments = application["deployments"]
    assert deployments["Ingress"]["status"] == "HEALTHY"
    assert deployments["Model-smollm2-135m-instruct"]["status"] == "HEALTHY"


def test_rate_limit_from_the_environment(served):
    url, _ = served
    response = httpx.get(f"{url}/v1/models", timeout=30)  # a counted route (probes are not)
    assert response.headers["X-RateLimit-Limit"] == "100"


def test_openai_client_chat_gets_a_sensible_answer(served):
    url, _ = served
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        chat = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=40,
            temperature=0,
        )
        assert "Paris" in chat.choices[0].message.content
        assert chat.choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smollm2-135m-instruct", prompt="x", temperature=-1)


def test_streamed_emoji_arrive_whole(served):
    url, _ = served
    messages = [{"role": "user", "content": "Write three emojis about the sea."}]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            whole = await client.chat.completions.create(
                model="smollm2-135m-instruct", messages=messages, max_tokens=30, temperature=0
            )
            stream = await client.chat.completions.create(
                model="smollm2-135m-instruct", messages=messages, max_tokens=30, temperature=0, stream=True
            )
            deltas = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
            return whole.choices[0].message.content, deltas

    whole, deltas = asyncio.run(run())
    assert any(ord(character) > 0xFFFF for character in whole), f"expected emoji in {whole!r}"
    assert "".join(deltas) == whole
    assert not any("\ufffd" in delta for delta in deltas)
