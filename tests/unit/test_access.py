"""Identity, API keys and rate-limit headers, without Ray (counters in local memory)."""

import asyncio
import ipaddress
import hashlib

import pytest
from fastapi.testclient import TestClient

from deployments.config import ModelConfig
from deployments.settings import Settings
from serve_app.access import AccessControl, build_access_control, client_address
from serve_app.errors import route_path
from serve_app.args import AuthArgs, IngressArgs, RateLimitArgs
from serve_app.auth import ApiKeyConfigError, ApiKeys, parse_key_entries, presented_key
from serve_app.ingress import Ingress, create_api
from serve_app.rate_limit import LimitState, Quota, RateLimiter, StorageBackend
from tests.fakes import FakeEngine, FakeModelHandle, fake_source

ALICE_KEY = "alice-secret-key-0123456789"
BOB_KEY = "bob-secret-key-0123456789ab"


def scope(peer="203.0.113.9", forwarded=None, path="/generate", root=""):
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return {"type": "http", "client": (peer, 1234), "headers": headers, "path": root + path, "root_path": root}


PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")]


def test_address_is_the_peer_without_trusted_proxies():
    assert client_address(scope(forwarded="1.2.3.4"), []) == "203.0.113.9"


def test_forwarded_for_from_an_untrusted_peer_is_ignored():
    assert client_address(scope(peer="198.51.100.1", forwarded="1.2.3.4"), PROXIES) == "198.51.100.1"


def test_forwarded_for_from_a_trusted_proxy_names_the_client():
    assert client_address(scope(peer="10.0.0.5", forwarded="1.2.3.4"), PROXIES) == "1.2.3.4"


def test_spoofed_left_entries_are_skipped_for_the_rightmost_untrusted():
    # The client wrote "6.6.6.6"; the proxies appended the real 1.2.3.4 and themselves.
    assert client_address(scope(peer="10.0.0.5", forwarded="6.6.6.6, 1.2.3.4, 10.0.0.7"), PROXIES) == "1.2.3.4"


def test_route_path_drops_the_serve_route_prefix():
    assert route_path(scope(path="/healthz", root="/app")) == "/healthz"


def test_key_entries_parse_plain_and_hashed():
    digest = hashlib.sha256(BOB_KEY.encode()).hexdigest()
    digests = parse_key_entries(f"alice:{ALICE_KEY}\n# comment\n\nbob:sha256:{digest}", "test")
    keys = ApiKeys(digests)
    assert keys.identify(ALICE_KEY) == "alice" and keys.identify(BOB_KEY) == "bob"
    assert keys.identify("alice-secret-key-012345678X") is None
    assert ALICE_KEY not in repr(keys) and ALICE_KEY.encode() not in b"".join(digests.values())


@pytest.mark.parametrize(
    "text, message",
    [
        ("no-separator", "must be `name:key`"),
        ("alice:short", "shorter than 16"),
        (f"alice:{ALICE_KEY},alice:{BOB_KEY}", "appears twice"),
        (f"bad name:{ALICE_KEY}", "must be `name:key`"),
    ],
)
def test_malformed_key_entries_are_refused_without_echoing_keys(text, message):
    with pytest.raises(ApiKeyConfigError, match=message) as caught:
        parse_key_entries(text, "TEXTGEN_API_KEYS")
    assert ALICE_KEY not in str(caught.value)


def test_keys_load_from_environment_and_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"bob:{BOB_KEY}\n")
    keys = ApiKeys.load(f"alice:{ALICE_KEY}", [key_file])
    assert sorted(keys.names) == ["alice", "bob"]
    with pytest.raises(ApiKeyConfigError, match="cannot read"):
        ApiKeys.load(None, [tmp_path / "missing"])


def test_presented_key_reads_bearer_or_x_api_key():
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "xyz"}) == "xyz"
    assert presented_key({"authorization": "Basic abc"}) is None


def test_limit_state_headers():
    assert LimitState(10, 3, 41.2).headers() == {
        "X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "3", "X-RateLimit-Reset": "42"
    }
    assert LimitState(10, -2, -1).headers()["X-RateLimit-Remaining"] == "0"


def test_auth_without_keys_fails_at_start_with_how_to_fix():
    with pytest.raises(ApiKeyConfigError, match="TEXTGEN_API_KEYS"):
        build_access_control(RateLimitArgs(), AuthArgs(enabled=True), Settings(api_keys=None), "app")


def test_environment_overrides_the_default_request_limits():
    settings = Settings(rate_limit="3/second;50/hour")
    access = build_access_control(RateLimitArgs(), AuthArgs(), settings, "app")
    assert access.anonymous(scope()).quota.requests == ("3/second", "50/hour")
    off = build_access_control(RateLimitArgs(), AuthArgs(), Settings(rate_limit="off"), "app")
    assert off.anonymous(scope()).quota.unlimited


def make_client(access: AccessControl) -> TestClient:
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    ingress = Ingress({"fake": FakeModelHandle(engine)}, RateLimitArgs(), AuthArgs())
    return TestClient(create_api(ingress, access), raise_server_exceptions=False)


def memory_limiter() -> RateLimiter:
    return RateLimiter(StorageBackend("memory://"), "moving-window", fail_open=True, timeout_s=1)


def test_limit_gives_429_with_retry_after_and_headers_on_counted_routes():
    access = AccessControl(memory_limiter(), Quota(requests=("3/minute",)))
    with make_client(access) as client:
        responses = [client.post("/generate", json={"prompt": "a", "max_new_tokens": 1}) for _ in range(5)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
        assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0", "0"]
        assert all(r.headers["X-RateLimit-Limit"] == "3" for r in responses)
        assert 0 < int(responses[-1].headers["X-RateLimit-Reset"]) <= 60
        refused = responses[-1]
        assert "rate limit of 3 requests per minute exceeded" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.json()["error"]["type"] == "rate_limit_error"
        # Responses that count nothing still report the standing.
        invalid = client.post("/generate", json={"prompt": ""})
        assert invalid.status_code == 422 and invalid.headers["X-RateLimit-Remaining"] == "0"
        # Probes are never counted, so they report no standing (and cost no store call).
        for probe in ("/healthz", "/health", "/ping"):
            assert "X-RateLimit-Limit" not in client.get(probe).headers
        assert "X-RateLimit-Limit" not in client.post("/ping").headers
        # Other utility routes report the standing, as /v1/models does.
        version = client.get("/version")
        assert version.status_code == 200 and version.headers["X-RateLimit-Remaining"] == "0"


def test_invalid_requests_do_not_use_up_the_limit():
    access = AccessControl(memory_limiter(), Quota(requests=("2/minute",)))
    with make_client(access) as client:
        for _ in range(3):
            assert client.post("/generate", json={"prompt": "a", "temperature": 9}).status_code == 422
        assert client.post("/generate", json={"prompt": "a", "max_new_tokens": 1}).status_code == 200


def test_api_keys_gate_and_identify_clients():
    keys = ApiKeys(parse_key_entries(f"alice:{ALICE_KEY},bob:{BOB_KEY}", "test"))
    access = AccessControl(
        memory_limiter(), Quota(requests=("1/minute",)), {"alice": Quota(requests=("2/minute",))}, keys
    )
    with make_client(access) as client:
        missing = client.post("/generate", json={"prompt": "a"})
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "authentication_error"
        wrong = client.post("/generate", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["message"]
        assert client.get("/healthz").status_code == 200, "probes need no key"
        assert client.get("/health").status_code == 200 and client.get("/ping").status_code == 200
        assert client.get("/tokenizer_info").status_code == 401 and client.get("/version").status_code == 401

        def generate(key):
            return client.post("/generate", json={"prompt": "a", "max_new_tokens": 1}, headers={"X-API-Key": key})

        assert [generate(ALICE_KEY).status_code for _ in range(3)] == [200, 200, 429]
        assert [generate(BOB_KEY).status_code for _ in range(2)] == [200, 429]


class CountingBackend(StorageBackend):
    """The memory store, counting the calls that reach it."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.calls = 0

    async def admit(self, *args):
        self.calls += 1
        return await super().admit(*args)

    async def peek(self, *args):
        self.calls += 1
        return await super().peek(*args)

    async def settle_tokens(self, *args):
        self.calls += 1
        return await super().settle_tokens(*args)


def test_requests_without_a_valid_key_never_reach_the_store_and_are_limited_per_address():
    keys = ApiKeys(parse_key_entries(f"alice:{ALICE_KEY}", "test"))
    backend = CountingBackend("memory://")
    limiter = RateLimiter(backend, "moving-window", fail_open=True, timeout_s=1)
    access = AccessControl(limiter, Quota(requests=("100/minute",)), api_keys=keys, unauthenticated_limit="3/minute")
    with make_client(access) as client:
        statuses = [client.post("/generate", json={"prompt": "a"}, headers={"X-API-Key": "wrong"}).status_code
                    for _ in range(5)]
        probes = [client.get("/healthz").status_code, client.get("/readyz").status_code]
        assert backend.calls == 0, "no store round trip for a 401, a 429 without a key, or a probe"
        assert statuses == [401, 401, 401, 429, 429]
        refused = client.post("/generate", json={"prompt": "a"})
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "without a valid API key" in refused.json()["error"]["message"]
        assert "X-RateLimit-Limit" not in refused.headers
        assert probes == [200, 200]
        ok = client.post("/generate", json={"prompt": "a", "max_new_tokens": 1}, headers={"X-API-Key": ALICE_KEY})
        assert ok.status_code == 200 and backend.calls >= 1, "a keyed request still counts"


def test_a_flood_of_invalid_requests_never_reaches_the_store_and_is_limited_per_client():
    backend = CountingBackend("memory://")
    limiter = RateLimiter(backend, "moving-window", fail_open=True, timeout_s=1)
    access = AccessControl(limiter, Quota(requests=("100/minute",), tokens=("10000/minute",)),
                           invalid_request_limit="5/minute")
    with make_client(access) as client:
        bad = [
            client.post("/generate", json={"prompt": "a", "temperature": 9}),  # 422
            client.post("/v1/completions", json={"model": "nope", "prompt": "a"}),  # 404
            client.get("/generate"),  # 405
            client.post("/generate", content=b"{}", headers={"Content-Type": "text/plain"}),  # 415
            client.post("/generate", json={"prompt": ""}),  # 422
        ]
        assert [r.status_code for r in bad] == [422, 404, 405, 415, 422]
        assert backend.calls == 0, "no store round trip for a request refused before admission"
        assert not any("X-RateLimit-Limit" in r.headers for r in bad), "no standing seen yet: none reported"
        past = [client.post("/generate", json={"prompt": "a", "max_new_tokens": 1}) for _ in range(2)]
        assert [r.status_code for r in past] == [429, 429], "past its allowance, every request of the client waits"
        assert "too many invalid requests" in past[0].json()["error"]["message"]
        assert 1 <= int(past[0].headers["Retry-After"]) <= 60 and backend.calls == 0
    fresh = AccessControl(memory_limiter(), Quota(requests=("3/minute",)), invalid_request_limit="5/minute")
    with make_client(fresh) as client:
        assert client.post("/generate", json={"prompt": "a", "max_new_tokens": 1}).status_code == 200
        invalid = client.post("/generate", json={"prompt": "a", "temperature": 9})
        assert invalid.status_code == 422 and invalid.headers["X-RateLimit-Remaining"] == "2", "the last standing seen"


def test_token_quota_reserves_the_worst_case_and_keeps_only_what_was_used():
    access = AccessControl(memory_limiter(), Quota(tokens=("80/minute",)))
    with make_client(access) as client:
        statuses = []
        for _ in range(8):
            response = client.post("/generate", json={"prompt": "abcde", "max_new_tokens": 5})
            statuses.append(response.status_code)
            client.portal.call(access.limiter.wait_for_settlements)
        # Each reserves 5 bytes + 16 special + 5 new = 26 and uses 10 (the fake counts
        # characters): admitted while 10 per request used + 26 fit in 80.
        assert statuses == [200] * 6 + [429, 429]
        assert "token quota of 80 per minute has 20 left" in response.json()["error"]["message"]
        assert "may cost up to 26 tokens" in response.json()["error"]["message"]


def test_concurrent_requests_cannot_overdraw_a_token_quota():
    """The reservation is taken at admission: four requests in flight against 80 tokens
    cannot all be admitted, however little each ends up using."""
    async def scenario():
        limiter = memory_limiter()
        quota = Quota(tokens=("80/minute",))
        decisions = [await limiter.admit("ip:a", quota, tokens_needed=26) for _ in range(4)]
        admitted = [d for d in decisions if d.allowed]
        for decision in admitted:
            limiter.settle_tokens("ip:a", quota, 10, decision.reservation)
        await limiter.wait_for_settlements()
        after = await limiter.admit("ip:a", quota, tokens_needed=50)  # 30 used: 50 fits
        return [d.allowed for d in decisions], after.allowed

    assert asyncio.run(scenario()) == ([True, True, True, False], True)


def test_a_failed_request_gives_its_reservation_back():
    """The model refuses the prompt (422, over its context): nothing was generated, so
    nothing stays charged, and the next request finds the whole quota."""
    from tests.fakes import FAKE_CONTEXT_LENGTH

    long_prompt = "x" * FAKE_CONTEXT_LENGTH
    worst_case = len(long_prompt) + 16 + 4
    access = AccessControl(memory_limiter(), Quota(tokens=(f"{worst_case}/minute",)))
    with make_client(access) as client:
        refused = client.post("/generate", json={"prompt": long_prompt, "max_new_tokens": 4})
        client.portal.call(access.limiter.wait_for_settlements)
        assert refused.status_code == 422, refused.text
        short = client.post("/generate", json={"prompt": "x" * (FAKE_CONTEXT_LENGTH - 12), "max_new_tokens": 12})
        assert short.status_code == 200, "the whole quota is free again: " + short.text


def test_a_settlement_after_the_window_renewed_refunds_nothing():
    from serve_app.rate_limit import Reservation, WindowCounter
    from limits.aio.storage import MemoryStorage

    async def scenario():
        counter = WindowCounter(MemoryStorage())
        quota = Quota(tokens=("100/minute",))
        decision = await counter.admit("ip:a", quota, "fixed-window", tokens_needed=60)
        stale = Reservation(60, tuple(end - 60 for end in decision.reservation.windows))
        await counter.settle_tokens("ip:a", quota, 10, stale)  # from a window that ended
        refused = await counter.admit("ip:a", quota, "fixed-window", tokens_needed=50)
        await counter.settle_tokens("ip:a", quota, 10, decision.reservation)  # its own window
        admitted = await counter.admit("ip:a", quota, "fixed-window", tokens_needed=50)
        return refused.allowed, admitted.allowed

    assert asyncio.run(scenario()) == (False, True)


def test_headroom_is_remembered_only_far_from_the_limit():
    async def scenario():
        limiter = memory_limiter()
        quota = Quota(requests=("5/minute",))
        seen = []
        for _ in range(5):
            decision = await limiter.admit("ip:a", quota)
            seen.append((decision.state.remaining, limiter.has_headroom("ip:a")))
        return seen

    import asyncio

    # remaining 4, 3, 2 leave headroom (>= 2 left); 1 and 0 do not.
    assert asyncio.run(scenario()) == [(4, True), (3, True), (2, True), (1, False), (0, False)]


def test_a_refusal_after_an_overlapped_start_cancels_the_model_call():
    import asyncio

    class SlowHandle(FakeModelHandle):
        finished = 0

        async def _generate(self, params):
            await asyncio.sleep(0.5)
            SlowHandle.finished += 1
            return await super()._generate(params)

    limiter = memory_limiter()
    quota = Quota(requests=("20/minute",))
    access = AccessControl(limiter, quota)
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    ingress = Ingress({"fake": SlowHandle(engine)}, RateLimitArgs(), AuthArgs())
    with TestClient(create_api(ingress, access), raise_server_exceptions=False) as client:
        body = {"prompt": "a", "max_new_tokens": 1}
        assert client.post("/generate", json=body).status_code == 200
        identity = "ip:testclient"
        assert limiter.has_headroom(identity)
        # Another replica spends the rest of the limit meanwhile.
        for _ in range(19):
            client.portal.call(limiter.admit, identity, quota)
        refused = client.post("/generate", json=body)
        assert refused.status_code == 429
    # The refused request's model call was started, then cancelled before it finished
    # (or before it ran at all, when the refusal came first).
    assert SlowHandle.finished == 1


def test_every_forwarded_for_line_counts_and_junk_is_never_the_client():
    def with_lines(*lines, peer="10.0.0.5"):
        return {"type": "http", "client": (peer, 1), "path": "/generate", "root_path": "",
                "headers": [(b"x-forwarded-for", line.encode()) for line in lines]}

    # A proxy that adds a second line instead of appending: the last line is the nearest hop.
    assert client_address(with_lines("6.6.6.6", "1.2.3.4"), PROXIES) == "1.2.3.4"
    assert client_address(with_lines("not-an-address"), PROXIES) == "10.0.0.5", "junk is not a client"
    assert client_address(with_lines("1.2.3.4, 2001:DB8::1"), PROXIES) == "2001:db8::1", "normalised"


def test_ipv6_clients_count_per_64_block_and_ipv4_per_address():
    from serve_app.access import client_identity

    assert client_identity("2001:db8:1:2:aaaa::1") == client_identity("2001:db8:1:2:bbbb::9") == "ip:2001:db8:1:2::/64"
    assert client_identity("2001:db8:1:3::1") != client_identity("2001:db8:1:2::1")
    assert client_identity("::ffff:1.2.3.4") == client_identity("1.2.3.4") == "ip:1.2.3.4"
    assert client_identity("testclient") == "ip:testclient"


def test_keys_keep_every_character_and_comments_stand_on_their_own_line():
    digests = parse_key_entries(f"# team keys\nalice:{ALICE_KEY}#2\n  # bob left\n", "test")
    assert ApiKeys(digests).identify(f"{ALICE_KEY}#2") == "alice", "a # inside a key is the key's"
    assert ApiKeys(digests).identify(ALICE_KEY) is None
    with pytest.raises(ApiKeyConfigError, match="contains whitespace"):
        parse_key_entries(f"alice:{ALICE_KEY} # old comment style", "test")


def test_a_client_may_have_only_so_many_requests_in_flight():
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source(step_s=0.05)), "cpu")
    ingress = Ingress({"fake": FakeModelHandle(engine)}, RateLimitArgs(), AuthArgs())
    access = AccessControl(None, Quota(), max_concurrent_per_client=2)
    app = create_api(ingress, access)

    async def scenario():
        import httpx

        transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            body = {"prompt": "a", "max_new_tokens": 10}
            first = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(3)))
            after = await client.post("/generate", json=body)
            return [r.status_code for r in first], first, after.status_code

    statuses, responses, after = asyncio.run(scenario())
    assert sorted(statuses) == [200, 200, 429]
    [refused] = [r for r in responses if r.status_code == 429]
    assert "2 requests in flight" in refused.json()["error"]["message"] and refused.headers["Retry-After"] == "1"
    assert after == 200, "slots are given back when requests end"
    assert access._in_flight == {}


def test_a_body_that_trickles_in_holds_its_clients_slot_and_the_replicas_from_the_first_byte():
    """Until its body is read a request counted in neither, so one client could hold
    every slot of a replica by sending bodies slowly."""
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    ingress = Ingress({"fake": FakeModelHandle(engine)}, RateLimitArgs(), AuthArgs(),
                      limits=IngressArgs(max_ongoing_requests=2, body_read_timeout_s=30))
    access = AccessControl(None, Quota(), max_concurrent_per_client=1)
    app = create_api(ingress, access)
    body = b'{"prompt": "a", "max_new_tokens": 1}'

    async def request(client_address: str, receive) -> list[dict]:
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": "/generate", "raw_path": b"/generate",
                 "root_path": "", "scheme": "http", "query_string": b"", "server": ("test", 80),
                 "client": (client_address, 1234),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        await app(scope, receive, send)
        return sent

    async def whole_body():
        return {"type": "http.request", "body": body, "more_body": False}

    async def scenario():
        arrive = asyncio.Event()

        def trickling(reading: asyncio.Event):
            async def receive():
                reading.set()
                await arrive.wait()
                return {"type": "http.request", "body": body, "more_body": False}

            return receive

        reading = [asyncio.Event(), asyncio.Event()]
        slow = asyncio.ensure_future(request("198.51.100.7", trickling(reading[0])))
        await reading[0].wait()  # its body is being read: nothing has reached the route yet
        same_client = await request("198.51.100.7", whole_body)
        other = asyncio.ensure_future(request("198.51.100.8", trickling(reading[1])))
        await reading[1].wait()
        third = await request("198.51.100.9", whole_body)  # 2 of 2 replica slots held by bodies
        arrive.set()
        return same_client, third, await slow, await other

    same_client, third, slow, other = asyncio.run(scenario())
    assert same_client[0]["status"] == 429 and b"1 requests in flight" in same_client[1]["body"]
    assert third[0]["status"] == 503 and b"at capacity" in third[1]["body"]
    assert slow[0]["status"] == other[0]["status"] == 200
    assert access._in_flight == {}


def test_each_request_carries_its_tenant_and_weight_to_the_model():
    """Rows of the batch are shared by tenant (the key's name, or the address when keys
    are off), weighted as the key's quota says; the model side gets both with the
    request, plain and streamed, on every API."""

    class Recording(FakeEngine):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.seen: list[tuple[str, float]] = []

        def prepare(self, params):
            self.seen.append((params.tenant, params.tenant_weight))
            return super().prepare(params)

    engine = Recording(ModelConfig(name="fake", source=fake_source()), "cpu")
    keys = ApiKeys(parse_key_entries(f"alice:{ALICE_KEY},bob:{BOB_KEY}", "test"))
    access = AccessControl(memory_limiter(), Quota(), {"alice": Quota(weight=3.0)}, keys)
    ingress = Ingress({"fake": FakeModelHandle(engine)}, RateLimitArgs(), AuthArgs())
    with TestClient(create_api(ingress, access), raise_server_exceptions=False) as client:
        for key in (ALICE_KEY, BOB_KEY):
            headers = {"X-API-Key": key}
            assert client.post("/generate", json={"prompt": "a", "max_new_tokens": 1}, headers=headers).status_code == 200
            streamed = client.post("/v1/chat/completions", headers=headers, json={
                "model": "fake", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "stream": True})
            assert streamed.status_code == 200
    assert engine.seen == [("key:alice", 3.0)] * 2 + [("key:bob", 1.0)] * 2
    assert RateLimitArgs.model_validate({"keys": {"alice": {"weight": 3}}}).keys["alice"].to_quota().weight == 3.0


def test_tokenizing_counts_as_a_request_but_never_against_a_token_quota():
    access = AccessControl(memory_limiter(), Quota(requests=("4/minute",), tokens=("30/minute",)))
    with make_client(access) as client:
        spent = client.post("/generate", json={"prompt": "abcde", "max_new_tokens": 5})
        assert spent.status_code == 200  # reserves 26 of the 30 tokens, uses 10
        client.portal.call(access.limiter.wait_for_settlements)
        refused = client.post("/generate", json={"prompt": "abcde", "max_new_tokens": 9})
        assert refused.status_code == 429 and "token quota" in refused.json()["error"]["message"]
        long_text = "x" * 100  # more tokens than the quota has left: tokenizing costs none
        counted = [client.post("/tokenize", json={"prompt": long_text}) for _ in range(4)]
        # The request limit (4) counts them after the first /generate (a refusal counts nothing).
        assert [r.status_code for r in counted] == [200, 200, 200, 429]
        assert counted[0].json()["count"] == 100
        assert "rate limit of 4 requests per minute" in counted[-1].json()["error"]["message"]


def test_a_model_or_adapter_quota_applies_as_well_as_the_clients_own():
    """A request to an adapter with a quota of its own must fit both that quota (kept
    per client and adapter) and the client's: a restricted client gets no more through
    a generous adapter, and a refusal by one counts against neither."""
    access = AccessControl(memory_limiter(), Quota(requests=("3/minute",), tokens=("200/minute",)),
                           model_quotas={"fake:terse": Quota(requests=("2/minute",), tokens=("1000/minute",)),
                                         "fake:chatty": Quota(requests=("100/minute",))})
    engine = FakeEngine(ModelConfig(name="fake", source=fake_source()), "cpu")
    ingress = Ingress({"fake": FakeModelHandle(engine)}, RateLimitArgs(), AuthArgs(),
                      adapters={"fake": ("terse", "chatty")})
    with TestClient(create_api(ingress, access), raise_server_exceptions=False) as client:
        def send(model: str):
            return client.post("/generate", json={"prompt": "a", "max_new_tokens": 1, "model": model})

        terse = [send("fake:terse") for _ in range(3)]
        assert [r.status_code for r in terse] == [200, 200, 429], "the adapter's own quota"
        assert "on fake:terse" in terse[-1].json()["error"]["message"]
        assert terse[-1].headers["X-RateLimit-Limit"] == "2"
        chatty = [send("fake:chatty") for _ in range(2)]
        assert [r.status_code for r in chatty] == [200, 429], "the client's 3 a minute hold through any adapter"
        message = chatty[-1].json()["error"]["message"]
        assert "rate limit of 3 requests per minute exceeded for ip:testclient;" in message
        assert send("fake").status_code == 429, "the adapter's refusal above counted nothing, its admissions did"
