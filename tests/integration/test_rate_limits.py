"""Cluster-wide limits over HTTP: two ingress replicas share one count."""

import asyncio
import multiprocessing
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from serve_app.args import AppArgs, AuthArgs, IngressArgs, ModelArgs, QuotaArgs, RateLimitArgs
from tests.integration.conftest import deploy, free_port
from tests.redis_store import admit_together, start_redis

pytestmark = pytest.mark.integration

KEY_SMALL = "small-quota-key-0123456789"
KEY_BURST = "burst-key-0123456789abcdef"
KEY_OTHER = "other-quota-key-0123456789"
KEY_OPENAI = "openai-quota-key-0123456789"


def limited_app(tiny_model_dir, rate_limits: RateLimitArgs, auth: AuthArgs | None = None) -> AppArgs:
    return AppArgs(
        models=[ModelArgs(name="tiny", source=str(tiny_model_dir), num_cpus=0.1, num_replicas=1, autoscaling=None)],
        ingress=IngressArgs(num_replicas=2, num_cpus=0.1),
        rate_limits=rate_limits,
        auth=auth or AuthArgs(),
    )


def from_client(address: str) -> dict:
    # The tests' peer, 127.0.0.1, is a trusted proxy in these apps, so X-Forwarded-For
    # names the client: one machine can play many clients.
    return {"X-Forwarded-For": address}


async def burst(url: str, count: int, headers: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/generate", json={"prompt": "hi", "max_new_tokens": 1}, headers=headers)
              for _ in range(count))
        )


@pytest.fixture(scope="module")
def limits_url(serve_base_url, tiny_model_dir):
    rate_limits = RateLimitArgs(default=QuotaArgs(requests=["10/minute"]), trusted_proxies=["127.0.0.1/32"])
    url = deploy(serve_base_url, limited_app(tiny_model_dir, rate_limits), "limits")
    yield url
    serve.delete("limits")


def check_ten_of_fifteen(url: str, client: str, atomic_standing: bool = True) -> None:
    """15 concurrent requests against 10/minute: exactly 10 pass.

    The actor store counts and reads the standing in one step, so the ten successes
    report remaining 9..0; Redis reads it after counting, when concurrent requests may
    already have been counted too, so there it is only bounded.
    """
    responses = asyncio.run(burst(url, 15, from_client(client)))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(refused)) == (10, 5), [r.status_code for r in responses]
    remaining = sorted(int(r.headers["X-RateLimit-Remaining"]) for r in ok)
    if atomic_standing:
        assert remaining == list(range(10))
    else:
        assert all(0 <= value <= 9 for value in remaining)
    for response in responses:
        assert response.headers["X-RateLimit-Limit"] == "10"
        assert 0 < int(response.headers["X-RateLimit-Reset"]) <= 60
    for response in refused:
        assert response.headers["X-RateLimit-Remaining"] == "0"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert response.json()["error"]["type"] == "rate_limit_error"


def test_two_ingress_replicas_let_exactly_the_limit_through(limits_url, cluster):
    ingress = serve.status().applications["limits"].deployments["Ingress"]
    assert ingress.replica_states.get("RUNNING") == 2
    check_ten_of_fifteen(limits_url, "192.0.2.1")
    # Shown, not assumed: both ingress replicas answered some of the burst (each logs
    # one line per request), so the count was shared across processes.
    logs = list((cluster.session_dir / "logs" / "serve").glob("replica_limits_Ingress_*.log"))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        serving = [log for log in logs if "/generate status=" in log.read_text(errors="replace")]
        if len(serving) == 2:
            break
        time.sleep(0.5)
    assert len(serving) == 2, (logs, serving)


def test_clients_are_counted_apart(limits_url):
    asyncio.run(burst(limits_url, 10, from_client("192.0.2.2")))
    assert asyncio.run(burst(limits_url, 1, from_client("192.0.2.2")))[0].status_code == 429
    assert asyncio.run(burst(limits_url, 1, from_client("192.0.2.3")))[0].status_code == 200


def test_killing_the_limiter_actor_never_gives_a_500(limits_url):
    actor = ray.get_actor("textgen-rate-limits:limits", namespace="textgen")
    statuses: list[int] = []
    stop = threading.Event()

    def keep_sending():
        with httpx.Client(timeout=60) as client:
            index = 0
            while not stop.is_set():
                index += 1
                response = client.post(
                    f"{limits_url}/generate",
                    json={"prompt": "hi", "max_new_tokens": 1},
                    headers=from_client(f"198.51.100.{index % 200 + 1}"),
                )
                statuses.append(response.status_code)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    time.sleep(1)
    ray.kill(actor, no_restart=False)  # as if its process crashed; Ray restarts it
    time.sleep(4)
    stop.set()
    sender.join(timeout=60)
    assert statuses and set(statuses) <= {200, 429}, sorted(set(statuses))
    # Restarted (empty) counters enforce the limit again.
    check_ten_of_fifteen(limits_url, "192.0.2.50")


@pytest.fixture(scope="module")
def keys_url(serve_base_url, tiny_model_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"small:{KEY_SMALL}\nother:{KEY_OTHER}\nburst:{KEY_BURST}\nopenai:{KEY_OPENAI}\n")
    rate_limits = RateLimitArgs(
        default=QuotaArgs(requests=["100/minute"]),
        keys={
            "small": QuotaArgs(requests=["100/minute"], tokens=["100/minute"]),
            "burst": QuotaArgs(requests=["100/minute"], tokens=["100/minute"]),
            "openai": QuotaArgs(requests=["5/minute"], tokens=["100/minute"]),
        },
    )
    args = limited_app(tiny_model_dir, rate_limits, AuthArgs(enabled=True, keys_file=key_file))
    url = deploy(serve_base_url, args, "keys")
    yield url
    serve.delete("keys")


QUOTA_PROBE = {"prompt": "one two three four", "max_new_tokens": 6, "temperature": 0}
# What each probe reserves: one token per prompt byte, 16 special tokens, 6 new.
PROBE_WORST_CASE = len(QUOTA_PROBE["prompt"]) + 16 + 6


def test_a_keys_token_quota_stops_it_before_it_can_overdraw(keys_url):
    def generate(key):
        return httpx.post(
            f"{keys_url}/generate", json=QUOTA_PROBE, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )

    statuses, spent = [], 0
    while len(statuses) < 12:
        response = generate(KEY_SMALL)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
        spent += response.json()["usage"]["total_tokens"]
        time.sleep(0.3)  # the unused reservation is given back just after the response
    assert statuses[-1] == 429 and statuses[:-1] == [200] * (len(statuses) - 1)
    assert spent <= 100 < spent + PROBE_WORST_CASE, "refused exactly when its worst case no longer fits"
    assert "token quota of 100 per minute" in response.json()["error"]["message"]
    assert generate(KEY_OTHER).status_code == 200, "another key has its own quota"
    assert httpx.post(f"{keys_url}/generate", json={"prompt": "hi"}, timeout=60).status_code == 401


def test_concurrent_requests_cannot_overdraw_a_token_quota(keys_url):
    """Eight requests at once against 100 tokens, each reserving 64 (its worst case)
    and using about 35: admission reserves the worst case, so however they interleave
    at most two are admitted and the key is charged at most its 100. Charged after the
    fact, as before, all eight ran and cost about 280."""
    body = {"prompt": QUOTA_PROBE["prompt"], "max_new_tokens": 30, "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(
                client.post(f"{keys_url}/generate", json=body, headers={"X-API-Key": KEY_BURST})
                for _ in range(8)
            ))

    responses = asyncio.run(burst())
    admitted = [r for r in responses if r.status_code == 200]
    assert {r.status_code for r in responses} <= {200, 429}
    assert 1 <= len(admitted) <= 2, [r.status_code for r in responses]
    assert sum(r.json()["usage"]["total_tokens"] for r in admitted) <= 100


def test_v1_routes_get_the_same_keys_limits_and_quotas(keys_url):
    """The real `openai` client on /v1: a wrong key is a 401 end to end; a key's request
    limit and token quota hold as on /generate, with the same headers."""
    import openai

    wrong = openai.OpenAI(base_url=f"{keys_url}/v1", api_key="wrong-key-0123456789abc", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt="hi", max_tokens=1)
    client = openai.OpenAI(base_url=f"{keys_url}/v1", api_key=KEY_OPENAI, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert raw.headers["X-RateLimit-Limit"] == "5" and raw.headers["X-RateLimit-Remaining"] == "4"
    completion = raw.parse()
    assert completion.usage.total_tokens <= 100
    # Worst case of this completion: 4 prompt bytes + 16 + 60 new = 80 does not fit in
    # what the chat left: refused before generating, naming the quota.
    time.sleep(0.3)  # the chat's unused reservation is given back just after its answer
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="tiny", prompt="four", max_tokens=100 - completion.usage.total_tokens)
    assert "token quota of 100" in caught.value.body["message"]
    for _ in range(4):  # the refused request counted nothing: 1 + 4 = 5 requests
        client.completions.create(model="tiny", prompt="a", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="tiny", prompt="a", max_tokens=1)
    assert "rate limit of 5 requests per minute" in caught.value.body["message"]


@pytest.fixture(scope="module")
def redis_url(serve_base_url, tiny_model_dir, tmp_path_factory):
    port = free_port()
    redis = start_redis(port)
    try:
        rate_limits = RateLimitArgs(
            default=QuotaArgs(requests=["10/minute"]),
            storage=f"redis://127.0.0.1:{port}/0",
            trusted_proxies=["127.0.0.1/32"],
        )
        url = deploy(serve_base_url, limited_app(tiny_model_dir, rate_limits), "redis")
        yield url
        serve.delete("redis")
    finally:
        redis.terminate()
        redis.wait(timeout=10)


@pytest.fixture
def bare_redis():
    """A redis-server of its own (no app uses it)."""
    port = free_port()
    redis = start_redis(port)
    yield f"redis://127.0.0.1:{port}/0"
    redis.terminate()
    redis.wait(timeout=10)


def test_ingress_replicas_racing_on_redis_never_overdraw_a_token_quota(bare_redis):
    """4 processes (as 4 ingress replicas) x 8 concurrent 900-token reservations against
    1000 tokens a minute: the quota fits one, and exactly one is admitted (test, then
    await, then charge admitted 15 of 32)."""
    context = multiprocessing.get_context("spawn")
    start, admitted = context.Barrier(4), context.Queue()
    racers = [context.Process(target=admit_together, args=(bare_redis, "1000/minute", 900, 8, start, admitted))
              for _ in range(4)]
    for racer in racers:
        racer.start()
    counts = [admitted.get(timeout=60) for _ in racers]
    for racer in racers:
        racer.join(timeout=30)
    assert sum(counts) == 1, counts


def test_a_token_refund_on_redis_lands_in_its_own_window_and_only_there(bare_redis):
    from serve_app.rate_limit import Quota, RateLimiter, Reservation, StorageBackend

    async def scenario() -> list:
        limiter = RateLimiter(StorageBackend(bare_redis), "fixed-window", fail_open=False, timeout_s=5)
        tokens = Quota(tokens=("1000/minute",))
        seen = []
        reserved = await limiter.admit("key:a", tokens, 900)
        stale = Reservation(900, tuple(start - 60 for start in reserved.reservation.windows))
        limiter.settle_tokens("key:a", tokens, 10, stale)  # held by a window that has ended
        await limiter.wait_for_settlements()
        seen.append((await limiter.admit("key:a", tokens, 200)).allowed)  # still 900 charged
        limiter.settle_tokens("key:a", tokens, 10, reserved.reservation)  # its own window: 890 back
        await limiter.wait_for_settlements()
        again = await limiter.admit("key:a", tokens, 990)  # 10 + 990 = the whole quota
        seen += [again.allowed, (await limiter.admit("key:a", tokens, 1)).allowed]
        limiter.settle_tokens("key:a", tokens, 1000, again.reservation)  # used 10 more than it held
        await limiter.wait_for_settlements()
        seen.append((await limiter.admit("key:a", tokens, 1)).state.remaining)  # the 10 were charged
        # A request that a request limit refuses gives back what it reserved.
        both = Quota(requests=("1/minute",), tokens=("1000/minute",))
        seen += [(await limiter.admit("key:b", both, 500)).allowed, (await limiter.admit("key:b", both, 500)).allowed]
        seen.append((await limiter.admit("key:b", tokens, 500)).allowed)
        return seen

    assert asyncio.run(scenario()) == [False, True, False, -10, True, False, True]


def test_redis_backend_gives_the_same_results(redis_url):
    check_ten_of_fifteen(redis_url, "192.0.2.77", atomic_standing=False)
    assert asyncio.run(burst(redis_url, 1, from_client("192.0.2.78")))[0].status_code == 200


def limiter_errors(metrics_url: str) -> float:
    total = 0.0
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_textgen_rate_limiter_errors_total{") and 'backend="redis"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_store_outage_is_counted_and_handled_as_configured(serve_base_url, cluster, tiny_model_dir):
    """redis-server stopped under two apps: the fail-open one lets requests through, the
    fail-closed one answers 503 with Retry-After, the metric counts the failed checks,
    and both count again once the store is back."""
    port = free_port()
    redis = start_redis(port)
    urls = {}
    try:
        for fail_open in (True, False):
            rate_limits = RateLimitArgs(
                default=QuotaArgs(requests=["1000/minute"]), storage=f"redis://127.0.0.1:{port}/0",
                fail_open=fail_open, timeout_s=0.5,
            )
            name = "outage-open" if fail_open else "outage-closed"
            urls[fail_open] = deploy(serve_base_url, limited_app(tiny_model_dir, rate_limits), name)

        def generate(fail_open: bool) -> httpx.Response:
            return httpx.post(f"{urls[fail_open]}/generate", json={"prompt": "hi", "max_new_tokens": 1}, timeout=60)

        assert generate(True).status_code == generate(False).status_code == 200
        errors_before = limiter_errors(cluster.metrics_url)
        redis.terminate()
        redis.wait(timeout=10)
        during = [(generate(True).status_code, generate(False)) for _ in range(3)]
        assert [open_status for open_status, _ in during] == [200] * 3, "fail_open lets requests through"
        assert [closed.status_code for _, closed in during] == [503] * 3, "fail_open: false refuses them"
        assert during[0][1].headers["Retry-After"] and "rate limiter unavailable" in during[0][1].text
        deadline = time.monotonic() + 20
        while limiter_errors(cluster.metrics_url) < errors_before + 6 and time.monotonic() < deadline:
            time.sleep(1)
        assert limiter_errors(cluster.metrics_url) >= errors_before + 6, "every failed check is counted"
        redis = start_redis(port)
        deadline = time.monotonic() + 20
        while generate(False).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert generate(False).status_code == 200, "the store answers again: requests are admitted"
    finally:
        for name in ("outage-open", "outage-closed"):
            serve.delete(name)
        redis.terminate()
        redis.wait(timeout=10)
