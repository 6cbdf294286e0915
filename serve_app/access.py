"""Who is calling and what they may spend: API keys, client identity, rate limits, and
the X-RateLimit-* headers on every response."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import metrics
from deployments.settings import Settings
from serve_app.args import AuthArgs, RateLimitArgs
from serve_app.auth import ApiKeyConfigError, ApiKeys, presented_key
from serve_app.errors import ServiceError, error_response, route_path, speaks_openai
from serve_app.request_context import PROBE_PATHS, SCHEMA_PATHS, route_label
from serve_app.rate_limit import (
    Backend,
    Quota,
    RateLimiter,
    RayActorBackend,
    StorageBackend,
    StoreUnavailableError,
)

logger = logging.getLogger("ray.serve")

# Probes and the schema stay reachable without a key and are never limited.
OPEN_PATHS = PROBE_PATHS | SCHEMA_PATHS
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Client:
    """A caller: ``key:<name>`` when keys are on, else ``ip:<address>``."""

    identity: str
    quota: Quota


def client_address(scope: Scope, trusted_proxies: Sequence[Network]) -> str:
    """The caller's address. ``X-Forwarded-For`` counts only when the peer is a trusted
    proxy; then the right-most address that is not itself a trusted proxy is the client
    (entries further left could have been written by the client). Every header line
    counts (a proxy may add its own line rather than append), and an entry that is not
    an IP address is never taken for the client: the peer is, then."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    if not trusted_proxies or not _is_trusted(peer, trusted_proxies):
        return peer
    lines = Headers(scope=scope).getlist("x-forwarded-for")
    hops = [hop.strip() for line in lines for hop in line.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted_proxies):
            return str(ipaddress.ip_address(hop)) if _is_address(hop) else peer
    return hops[0] if hops and _is_address(hops[0]) else peer


def client_identity(address: str) -> str:
    """Who counts as one client: an IPv4 address, or an IPv6 /64, the block one
    subscriber usually holds whole (counting single IPv6 addresses, a client would
    get a fresh quota from each of its 2^64 addresses)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"ip:{address}"
    if ip.version == 4:
        return f"ip:{ip}"
    if ip.ipv4_mapped is not None:
        return f"ip:{ip.ipv4_mapped}"
    return f"ip:{ipaddress.ip_network(f'{ip}/64', strict=False)}"


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted_proxies: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted_proxies)


class UnauthenticatedError(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(401, message, error_type="authentication_error", headers={"WWW-Authenticate": "Bearer"})


class AccessControl:
    """Identifies clients and applies their quotas.

    Args:
        limiter: the shared limiter, or None when rate limiting is off.
        default_quota: quota of clients without one of their own.
        key_quotas: quota per API key name.
        api_keys: the keys, or None when keys are off.
        trusted_proxies: proxies whose X-Forwarded-For is believed.
        model_quotas: quota per served model or adapter, per client, for requests to it
            as well as the client's own.
    """

    def __init__(
        self,
        limiter: RateLimiter | None,
        default_quota: Quota,
        key_quotas: Mapping[str, Quota] | None = None,
        api_keys: ApiKeys | None = None,
        trusted_proxies: Sequence[Network] = (),
        unauthenticated_limit: str = AuthArgs.model_fields["unauthenticated_limit"].default,
        max_concurrent_per_client: int | None = None,
        model_quotas: Mapping[str, Quota] | None = None,
        invalid_request_limit: str = RateLimitArgs.model_fields["invalid_request_limit"].default,
    ) -> None:
        self.limiter = limiter
        self._default_quota = default_quota
        self._key_quotas = dict(key_quotas or {})
        self._model_quotas = dict(model_quotas or {})
        self._api_keys = api_keys
        self._trusted_proxies = list(trusted_proxies)
        self._unauthenticated_limit = parse(unauthenticated_limit)
        self._invalid_request_limit = parse(invalid_request_limit)
        # Allowances counted in this replica's memory, never the shared store.
        self._allowances = MovingWindowRateLimiter(MemoryStorage())
        self._max_concurrent = max_concurrent_per_client
        self._in_flight: dict[str, int] = {}  # per client, in this replica

    async def unauthenticated_retry_after(self, client: Client) -> int | None:
        """Counts a request without a valid key against its address's allowance, in
        this replica's memory (never the shared store: those requests cost their
        senders nothing). Returns None while within it, else seconds to wait."""
        if await self._allowances.hit(self._unauthenticated_limit, "unauthenticated", client.identity):
            return None
        return await self._retry_after(self._unauthenticated_limit, "unauthenticated", client)

    async def count_invalid(self, client: Client) -> None:
        """Counts a request refused before admission (a 4xx that never reached the
        store) against the client's allowance of them, in this replica's memory."""
        await self._allowances.hit(self._invalid_request_limit, "invalid", client.identity)

    async def invalid_retry_after(self, client: Client) -> int | None:
        """None while the client is within its allowance of refused requests, else
        seconds until it may send again."""
        if self.limiter is None or await self._allowances.test(self._invalid_request_limit, "invalid", client.identity):
            return None
        return await self._retry_after(self._invalid_request_limit, "invalid", client)

    async def _retry_after(self, limit: RateLimitItem, kind: str, client: Client) -> int:
        stats = await self._allowances.get_window_stats(limit, kind, client.identity)
        return max(1, math.ceil(stats.reset_time - time.time()))

    def anonymous(self, scope: Scope) -> Client:
        return Client(client_identity(client_address(scope, self._trusted_proxies)), self._default_quota)

    def identify(self, scope: Scope) -> Client:
        """The caller of ``scope``.

        Raises:
            UnauthenticatedError: keys are on and the request has none, or a wrong one.
        """
        if self._api_keys is None or route_path(scope) in OPEN_PATHS:
            return self.anonymous(scope)
        key = presented_key(Headers(scope=scope))
        if key is None:
            raise UnauthenticatedError(
                "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
            )
        name = self._api_keys.identify(key)
        if name is None:
            raise UnauthenticatedError("the API key is not valid")
        return Client(f"key:{name}", self._key_quotas.get(name, self._default_quota))

    async def admit(self, request: Request) -> None:
        """Counts the request against its client's quota and reserves its worst-case
        tokens (``request.state.tokens_needed``) against the client's token quotas; the
        reservation is settled once, by `settle_tokens`, whatever becomes of the request.
        A request that generates nothing (``tokens_needed`` None) is counted, and token
        quotas are left alone.

        Raises:
            ServiceError: 429 when a limit is spent or the tokens do not fit, 503 when the
                store failed closed.
        """
        if self.limiter is None:
            return
        identity, quota = self.counted_as(request)
        tokens_needed = getattr(request.state, "tokens_needed", 0)
        try:
            decision = await self.limiter.admit(identity, quota, tokens_needed)
        except StoreUnavailableError:
            raise ServiceError(503, "rate limiter unavailable; retry shortly", headers={"Retry-After": "1"}) from None
        request.state.rate_limit = decision.state
        if not decision.allowed:
            metrics.record_rate_limited(route_label(request.scope))
            retry_after = max(1, math.ceil(decision.state.reset_after_s))
            if decision.refused_tokens:
                message = (
                    f"token quota of {decision.state.limit} per {decision.state.window} has {decision.state.remaining} left "
                    f"for {decision.refused_for or identity}; this request may cost up to {tokens_needed} tokens (prompt + "
                    f"every sequence's max new tokens); lower max_new_tokens or retry in {retry_after} s"
                )
            else:
                message = (
                    f"rate limit of {decision.state.limit} requests per {decision.state.window} exceeded for "
                    f"{decision.refused_for or identity}; retry in {retry_after} s"
                )
            raise ServiceError(429, message, headers={"Retry-After": str(retry_after)})
        request.state.reservation = decision.reservation
        request.state.settled = tokens_needed is None  # generates nothing: nothing to settle

    def counted_as(self, request: Request) -> tuple[str, Quota]:
        """What a request counts against: its client's quota and, for a model (or
        adapter) with a quota of its own, that quota too, counted per client and model;
        it is admitted only when both allow it."""
        client: Client = request.state.client
        model = getattr(request.state, "model", None)
        quota = self._model_quotas.get(model)
        if quota is None:
            return client.identity, client.quota
        return client.identity, dataclasses.replace(client.quota, scoped=((f" on {model}", quota),))

    def hold_a_slot(self, scope: Scope, client: Client) -> None:
        """Counts the request among its client's requests in flight here (released by
        `release`), from before its body is read (one that trickles in holds its slot
        too), or refuses it with 429 when the client has its most already."""
        if self._max_concurrent is None:
            return
        held = self._in_flight.get(client.identity, 0)
        if held >= self._max_concurrent:
            metrics.record_rate_limited(route_label(scope))
            raise ServiceError(
                429,
                f"{client.identity} has {held} requests in flight, the most allowed at once; "
                "retry when one has ended",
                headers={"Retry-After": "1"},
            )
        self._in_flight[client.identity] = held + 1
        scope["state"]["holds_slot"] = True

    def release(self, scope: Scope) -> None:
        """Ends what `hold_a_slot` and `admit` started for the request: its concurrency
        slot, and its token reservation if nothing settled it (an error, a timeout, a
        disconnect before generating)."""
        state = scope.get("state", {})
        client: Client | None = state.get("client")
        if state.pop("holds_slot", False) and client is not None:
            left = self._in_flight.get(client.identity, 1) - 1
            if left:
                self._in_flight[client.identity] = left
            else:
                self._in_flight.pop(client.identity, None)
        if not state.get("settled", True):
            usage = state.get("usage")
            self.settle_tokens(Request(scope), usage.total_tokens if usage else 0)

    def may_overlap(self, request: Request) -> bool:
        """Whether the quota check may run beside the model call rather than before it:
        only for a client this replica recently saw far from all its limits, so a
        client at its limit never reaches a model replica."""
        return self.limiter is not None and self.limiter.has_headroom(self.counted_as(request)[0])

    async def admit_around(self, request: Request, start_call: Callable[[], T]) -> T:
        """Admits the request, then starts ``start_call`` (a model call that can be
        cancelled); returns what it returned.

        The check costs one store round trip, more under load. For clients with
        headroom (`may_overlap`) the model call starts at once and the check runs beside
        it; should the check refuse after all, the call is cancelled (a batch drops a
        cancelled request at its next step) and the refusal is raised as usual.
        """
        if not self.may_overlap(request):
            await self.admit(request)
            return start_call()
        admission = asyncio.ensure_future(self.admit(request))
        call = start_call()
        try:
            await admission
        except BaseException:
            cancel_quietly(call)
            raise
        return call

    def settle_tokens(self, request: Request, used: int) -> None:
        """Settles an admitted request's reservation with the tokens it used (0 when it
        failed before generating); only the first call counts. Returns at once (the
        settlement runs as a task of its own, so it survives a cancelled caller and
        the client never waits for the store)."""
        state = request.state
        if self.limiter is None or getattr(state, "settled", True):
            return
        state.settled = True
        identity, quota = self.counted_as(request)
        self.limiter.settle_tokens(identity, quota, used, state.reservation)


def cancel_quietly(call) -> None:
    """Cancels a model call; one that already failed (refused for backpressure, say)
    re-raises its error from cancel(), and there is nothing left to stop."""
    try:
        call.cancel()
    except Exception:  # noqa: BLE001
        pass


def build_access_control(
    rate_limits: RateLimitArgs, auth: AuthArgs, settings: Settings, app_name: str
) -> AccessControl:
    """The access control of one ingress replica, from the app args and the environment.

    Raises:
        ApiKeyConfigError: keys are on but none are configured, or an entry is malformed.
    """
    api_keys = None
    if auth.enabled:
        files = [path for path in (auth.keys_file, settings.api_keys_file) if path]
        env_keys = settings.api_keys.get_secret_value() if settings.api_keys else None
        api_keys = ApiKeys.load(env_keys, files)
        if not api_keys.names:
            raise ApiKeyConfigError(
                "auth.enabled is true but no API keys are configured: set TEXTGEN_API_KEYS, "
                "TEXTGEN_API_KEYS_FILE or auth.keys_file"
            )
        unknown = sorted(set(rate_limits.keys) - set(api_keys.names))
        if unknown:
            logger.warning("rate_limits.keys names keys that do not exist: %s", ", ".join(unknown))
    default = Quota(
        requests=tuple(settings.default_request_limits(rate_limits.default.requests)),
        tokens=tuple(rate_limits.default.tokens),
    )
    limiter = None
    if rate_limits.enabled:
        backend: Backend = (
            RayActorBackend(f"textgen-rate-limits:{app_name}", namespace="textgen")
            if rate_limits.storage == "ray"
            else StorageBackend(rate_limits.storage)
        )
        limiter = RateLimiter(backend, rate_limits.strategy, rate_limits.fail_open, rate_limits.timeout_s)
    return AccessControl(
        limiter,
        default,
        {name: quota.to_quota() for name, quota in rate_limits.keys.items()},
        api_keys,
        rate_limits.trusted_proxies,
        auth.unauthenticated_limit,
        rate_limits.max_concurrent_per_client,
        {name: quota.to_quota() for name, quota in rate_limits.models.items()},
        rate_limits.invalid_request_limit,
    )


class AccessMiddleware:
    """Identifies the caller before routing (401 when a key is needed and missing) and
    puts the X-RateLimit-* headers on every response: the standing the route's check
    left, or, where no check ran (errors, probes), a look at the counters that counts
    nothing. Without limits there is no limit to report, and the headers are left out;
    if the store does not answer, they are left out rather than the response delayed
    past the limiter's timeout."""

    def __init__(self, app: ASGIApp, access: AccessControl) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        try:
            state["client"] = self.access.identify(scope)
        except UnauthenticatedError as exc:
            # Answered without the shared store (no count, no X-RateLimit-* headers):
            # a keyless flood must not slow the store, or switch limits off for everyone
            # by tripping fail_open. Past its address's allowance, 429 instead of 401.
            client = state["client"] = self.access.anonymous(scope)
            retry_after = await self.access.unauthenticated_retry_after(client)
            if retry_after is None:
                status, message, error_type, headers = exc.status_code, exc.message, exc.error_type, exc.headers
            else:
                status, error_type, headers = 429, None, {"Retry-After": str(retry_after)}
                message = f"too many requests without a valid API key from {client.identity}; retry in {retry_after} s"
            await error_response(status, message, None, error_type, headers, speaks_openai(scope))(scope, receive, send)
            return
        if route_path(scope) in OPEN_PATHS:  # probes and the schema: never counted, no headers
            await self.app(scope, receive, send)
            return
        client = state["client"]
        retry_after = await self.access.invalid_retry_after(client)
        if retry_after is not None:
            message = f"too many invalid requests from {client.identity}; fix them, and retry in {retry_after} s"
            metrics.record_rate_limited(route_label(scope))
            headers = {"Retry-After": str(retry_after)}
            await error_response(429, message, None, None, headers, speaks_openai(scope))(scope, receive, send)
            return
        try:
            self.access.hold_a_slot(scope, client)
        except ServiceError as exc:
            await error_response(exc.status_code, exc.message, None, None, exc.headers, speaks_openai(scope))(
                scope, receive, send
            )
            return
        try:
            await self.app(scope, receive, self._with_rate_headers(scope, send))
        finally:
            self.access.release(scope)

    def _with_rate_headers(self, scope: Scope, send: Send) -> Send:
        """Puts the client's standing on the response: the one its admission left; for a
        request refused before admission (a 4xx other than a limit's 429), the last this
        replica saw, counting the refusal against the client's allowance (never a store
        call: a flood of bad requests costs the store nothing); else (/v1/models,
        /version) a look at the counters, at most one a second per client."""
        limiter = self.access.limiter
        if limiter is None:
            return send
        state = scope["state"]

        async def send_with_rate_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                client: Client = state["client"]
                standing = state.get("rate_limit")
                if standing is None and 400 <= message["status"] < 500 and message["status"] != 429:
                    await self.access.count_invalid(client)
                    standing = limiter.last_standing(client.identity)
                elif standing is None:
                    standing = await limiter.peek(client.identity, client.quota)
                if standing is not None:
                    MutableHeaders(scope=message).update(standing.headers())
            await send(message)

        return send_with_rate_headers
