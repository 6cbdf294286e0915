"""LoRA adapters through Serve: two model replicas of the tiny model, two adapters made
with PEFT, at most one adapter held per replica. A request names an adapter as its
model; Serve's model multiplexing sends each adapter's requests to the replica that
holds it, and each answer is what PEFT gives with that adapter alone."""

import re
import time
import uuid

import httpx
import openai
import pytest
from ray import serve

from tests.integration.conftest import deploy, tiny_app_args
from tests.unit.test_lora import make_adapter, peft_greedy

pytestmark = pytest.mark.integration

APP = "lora"
PROMPT = "Once upon a time"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-adapters")
    return {
        "terse": make_adapter(tiny_model_dir, root / "terse", seed=1, rank=4, targets=["q_proj", "v_proj"]),
        "chatty": make_adapter(tiny_model_dir, root / "chatty", seed=2, rank=8, targets=["o_proj", "down_proj"]),
        "plain": make_adapter(tiny_model_dir, root / "plain", seed=3, rank=2, targets=["up_proj"]),
    }


@pytest.fixture(scope="module")
def lora_url(serve_base_url, tiny_model_dir, adapter_dirs):
    args = tiny_app_args(
        tiny_model_dir, num_replicas=2, num_cpus=0.2, dtype="float32", max_adapters=1,
        adapters={name: str(folder) for name, folder in adapter_dirs.items()},
    )
    url = deploy(serve_base_url, args, APP)
    yield url
    serve.delete(APP)


def replica_that_served(cluster, request_id: str) -> str:
    """The model replica whose log has the request's line (ModelServer._log_request)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for log in (cluster.session_dir / "logs" / "serve").glob(f"replica_{APP}_Model-*.log"):
            if f"request_id={request_id} " in log.read_text(errors="replace"):
                return log.stem
        time.sleep(0.3)
    raise AssertionError(f"no model replica logged {request_id}")


def generate(url: str, model: str) -> tuple[str, str]:
    request_id = f"lora-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"{url}/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "temperature": 0, "model": model},
        headers={"X-Request-ID": request_id}, timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.json()["text"], request_id


def test_each_adapters_requests_go_to_the_replica_that_holds_it(lora_url, cluster, tiny_model_dir, adapter_dirs):
    expected = {name: peft_greedy(tiny_model_dir, folder, PROMPT) for name, folder in adapter_dirs.items()}
    served: dict[str, list[str]] = {"tiny:terse": [], "tiny:chatty": []}
    for model in ["tiny:terse"] * 4 + ["tiny:chatty"] * 4:
        text, request_id = generate(lora_url, model)
        assert text == expected[model.partition(":")[2]]
        served[model].append(replica_that_served(cluster, request_id))
        time.sleep(1)  # replicas report what they hold every 0.1 s; routers hear it from the controller
    # An adapter's first request goes to a replica that holds the fewest adapters; the
    # ones after it, to the replica that now holds it.
    assert all(len(set(replicas)) == 1 for replicas in served.values()), served
    assert served["tiny:terse"][0] != served["tiny:chatty"][0], "one adapter per replica (max_adapters: 1)"
    assert generate(lora_url, "tiny")[0] == peft_greedy(tiny_model_dir, None, PROMPT)


def test_adapters_are_listed_with_their_parent_and_unknown_ones_are_404(lora_url):
    with openai.OpenAI(base_url=f"{lora_url}/v1", api_key="unused", max_retries=0) as client:
        listed = {card.id: getattr(card, "parent", None) for card in client.models.list().data}
        assert listed == {"tiny": None, "tiny:terse": "tiny", "tiny:chatty": "tiny", "tiny:plain": "tiny"}
        completion = client.completions.create(model="terse", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
        assert completion.model == "tiny:terse"
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model="tiny:nope", prompt=PROMPT)
    assert "tiny:nope" in caught.value.body["message"] and caught.value.body["code"] == "model_not_found"


def test_an_adapters_tokens_are_counted_under_its_own_name(lora_url, cluster):
    """Exactly this request's tokens are added under model="tiny:chatty" (earlier tests'
    tokens are there already: the count is read once it has settled)."""
    pattern = re.compile(r'ray_textgen_completion_tokens_total\{[^}]*model="tiny:chatty"[^}]*\} ([0-9.]+)')

    def counted() -> float:
        return sum(float(value) for value in pattern.findall(httpx.get(cluster.metrics_url, timeout=10).text))

    before, changed_at, deadline = counted(), time.monotonic(), time.monotonic() + 60
    while time.monotonic() - changed_at < 5:  # unchanged for 5 s: earlier tokens have all been reported
        time.sleep(1)
        if (now := counted()) != before:
            before, changed_at = now, time.monotonic()
        assert time.monotonic() < deadline, "the count never settled"
    answer = httpx.post(f"{lora_url}/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "temperature": 0,
                                                      "model": "tiny:chatty"}, timeout=60).json()
    expected = before + answer["usage"]["completion_tokens"]
    while (now := counted()) != expected:
        assert now < expected and time.monotonic() < deadline + 30, (now, expected)
        time.sleep(1)


def test_a_third_adapter_replaces_the_least_recently_used_one_on_a_replica(lora_url, cluster, tiny_model_dir,
                                                                          adapter_dirs):
    """Both replicas hold one adapter each (the test above): with max_adapters 1, the
    replica that takes the third replaces the one it held, and says so in its log."""
    text, _ = generate(lora_url, "tiny:plain")
    assert text == peft_greedy(tiny_model_dir, adapter_dirs["plain"], PROMPT)
    # The engine process logs to its replica's worker log (stderr).
    logs = "".join(path.read_text(errors="replace") for path in (cluster.session_dir / "logs").glob("worker-*.err"))
    assert re.search(r"adapter plain loaded into slot 1, replacing (terse|chatty)", logs), "the cap of one holds"
