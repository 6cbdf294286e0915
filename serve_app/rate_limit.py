"""Rate limits and token quotas that hold across every ingress replica.

The counting is the `limits` package's (moving/sliding/fixed windows, cost per hit);
this module chooses where its state lives so that all replicas share it:

- ``ray`` (default): a named, detached Ray actor per application holds a `limits`
  MemoryStorage; each request costs one actor call (about 1.6 ms idle on 2 cores).
  Ray restarts the actor if it dies (its counts start again from zero).
- ``redis://...``: `limits`' Redis storage, used directly from each replica.

A failing store never takes the service down: with ``fail_open`` the request goes
through, the failure is counted and logged once until the store answers again.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import logging
import math
import time

import ray
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.storage import storage_from_string
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter as WindowLimiter,
    SlidingWindowCounterRateLimiter,
)

from deployments import metrics

logger = logging.getLogger("ray.serve")

STRATEGIES = {
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}


@functools.cache
def parse_limit(text: str) -> RateLimitItem:
    return parse(text)


@dataclasses.dataclass(frozen=True)
class Quota:
    """What one client may spend: request limits and token limits (limits' notation,
    e.g. ``10/minute``). Empty means unlimited."""

    requests: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()

    @property
    def unlimited(self) -> bool:
        return not self.requests and not self.tokens


@dataclasses.dataclass(frozen=True)
class LimitState:
    """One limit's standing for a client, as sent in the X-RateLimit-* headers."""

    limit: int
    remaining: int
    reset_after_s: float
    window: str = "window"  # "minute", "10 seconds": what the limit is per

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.remaining)),
            "X-RateLimit-Reset": str(max(0, math.ceil(self.reset_after_s))),
        }


@dataclasses.dataclass(frozen=True)
class Decision:
    """Whether a request may proceed; ``state`` is the limit nearest to exhaustion (or,
    when refused, the limit that refused it). ``headroom``: every limit and quota is far
    from spent, so the client's next request is very likely to be admitted too.
    ``reservation``: the tokens held against each token quota, to settle at the end."""

    allowed: bool
    state: LimitState | None = None
    headroom: bool = False
    refused_tokens: bool = False
    reservation: Reservation | None = None


@dataclasses.dataclass(frozen=True)
class Reservation:
    """Tokens an admitted request holds against its client's token quotas: its worst
    case (prompt + every sequence's new tokens), charged at admission so that
    concurrent requests cannot overdraw the quota together. ``windows_end`` is when
    each quota's window (in order) ended at admission: a refund goes back only to that
    window."""

    tokens: int
    windows_end: tuple[float, ...]


def far_from_spent(remaining: float, limit: int) -> bool:
    """At least 10% of a limit (and two units) left."""
    return remaining >= max(2, 0.1 * limit)


class WindowCounter:
    """Runs `limits` strategies over one storage. Request limits use the configured
    strategy; token quotas use fixed windows, whose counters record a charge even when
    it overdraws the quota, so a client stays stopped until its window renews."""

    def __init__(self, storage: Storage) -> None:
        self._strategies: dict[str, WindowLimiter] = {
            name: cls(storage) for name, cls in STRATEGIES.items()
        }
        self._storage = storage

    async def admit(self, identity: str, quota: Quota, strategy: str, tokens_needed: int | None = 0) -> Decision:
        """Counts a request and reserves ``tokens_needed`` against every token quota,
        or refuses it (nothing counted) when a limit is spent or the reservation does
        not fit. In the Ray actor nothing else runs between the checks and the counts
        (MemoryStorage never suspends), so concurrent requests cannot both take the last
        tokens; with Redis, replicas may race by one request."""
        requests = self._strategies[strategy]
        tokens = self._strategies["fixed-window"]
        reserve = max(1, tokens_needed or 0)
        for text in quota.tokens if tokens_needed is not None else ():
            item = parse_limit(text)
            if not await tokens.test(item, "tokens", identity, cost=reserve):
                return Decision(False, await self._state(tokens, item, "tokens", identity), refused_tokens=True)
        for text in quota.requests:
            item = parse_limit(text)
            if not await requests.hit(item, "requests", identity):
                return Decision(False, await self._state(requests, item, "requests", identity))
        reservation = None
        if quota.tokens and tokens_needed:
            ends = []
            for text in quota.tokens:
                item = parse_limit(text)
                await tokens.hit(item, "tokens", identity, cost=tokens_needed)
                ends.append(await self._storage.get_expiry(item.key_for("tokens", identity)))
            reservation = Reservation(tokens_needed, tuple(ends))
        tightest = await self._tightest(identity, quota, strategy)
        headroom = tightest is None or far_from_spent(tightest.remaining, tightest.limit)
        for text in quota.tokens if headroom else ():
            standing = await self._state(tokens, parse_limit(text), "tokens", identity)
            headroom = headroom and far_from_spent(standing.remaining, standing.limit)
        return Decision(True, tightest, headroom, reservation=reservation)

    async def peek(self, identity: str, quota: Quota, strategy: str) -> LimitState | None:
        return await self._tightest(identity, quota, strategy)

    async def ping(self) -> bool:
        return await self._storage.check()

    async def settle_tokens(self, identity: str, quota: Quota, used: int, reservation: Reservation | None) -> None:
        """Charges what a request used against what it reserved: the unused part goes
        back to the window that held it (if that window still runs), and tokens past
        the reservation are charged to the current window."""
        reserved = reservation.tokens if reservation else 0
        for number, text in enumerate(quota.tokens):
            item = parse_limit(text)
            key = item.key_for("tokens", identity)
            same_window = reservation is not None and await self._storage.get_expiry(key) == reservation.windows_end[number]
            owed = used - reserved if same_window or used > reserved else 0
            if owed > 0:
                await self._strategies["fixed-window"].hit(item, "tokens", identity, cost=owed)
            elif owed < 0:
                await self._storage.incr(key, item.get_expiry(), amount=owed)

    async def _tightest(self, identity: str, quota: Quota, strategy: str) -> LimitState | None:
        states = [
            await self._state(self._strategies[strategy], parse_limit(text), "requests", identity)
            for text in quota.requests
        ]
        return min(states, key=lambda s: (s.remaining / s.limit, -s.reset_after_s), default=None)

    @staticmethod
    async def _state(strategy: WindowLimiter, item: RateLimitItem, *key: str) -> LimitState:
        stats = await strategy.get_window_stats(item, *key)
        unit = item.GRANULARITY.name
        window = unit if item.multiples == 1 else f"{item.multiples} {unit}s"
        return LimitState(item.amount, stats.remaining, stats.reset_time - time.time(), window)


class _CountsHere:
    """Answers the backend calls from a `WindowCounter` in this process."""

    _counter: WindowCounter

    async def admit(self, identity: str, quota: Quota, strategy: str, tokens_needed: int | None) -> Decision:
        return await self._counter.admit(identity, quota, strategy, tokens_needed)

    async def peek(self, identity: str, quota: Quota, strategy: str) -> LimitState | None:
        return await self._counter.peek(identity, quota, strategy)

    async def settle_tokens(self, identity: str, quota: Quota, used: int, reservation: Reservation | None) -> None:
        await self._counter.settle_tokens(identity, quota, used, reservation)


@ray.remote(num_cpus=0)
class RateLimitStore(_CountsHere):
    """The shared counters of one application: a named actor every ingress replica calls.
    Async, so calls are served one event-loop step at a time and each check-and-count
    is atomic."""

    def __init__(self) -> None:
        self._counter = WindowCounter(MemoryStorage())

    async def ping(self) -> bool:
        return await self._counter.ping()


class Backend(abc.ABC):
    """Where the counters live."""

    name: str

    @abc.abstractmethod
    async def admit(self, identity: str, quota: Quota, strategy: str, tokens_needed: int | None) -> Decision: ...

    @abc.abstractmethod
    async def peek(self, identity: str, quota: Quota, strategy: str) -> LimitState | None: ...

    @abc.abstractmethod
    async def settle_tokens(self, identity: str, quota: Quota, used: int, reservation: Reservation | None) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Returns once the store answers."""

    def reset(self) -> None:
        """Called after a failure, so that the next call reconnects."""


class RayActorBackend(Backend):
    """Counters in a named, detached actor shared by the application's ingress replicas.

    Detached, so it outlives the replica that happened to create it; ``max_restarts=-1``
    so Ray restarts it if it dies. After a failure the handle is looked up again by
    name (``get_if_exists`` creates the actor anew if it is gone for good).
    """

    name = "ray"

    def __init__(self, actor_name: str, namespace: str) -> None:
        self._actor_name, self._namespace = actor_name, namespace
        self._actor = None

    def _store(self):
        if self._actor is None:
            self._actor = RateLimitStore.options(
                name=self._actor_name,
                namespace=self._namespace,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
            ).remote()
        return self._actor

    async def admit(self, identity: str, quota: Quota, strategy: str, tokens_needed: int | None) -> Decision:
        return await self._store().admit.remote(identity, quota, strategy, tokens_needed)

    async def peek(self, identity: str, quota: Quota, strategy: str) -> LimitState | None:
        return await self._store().peek.remote(identity, quota, strategy)

    async def settle_tokens(self, identity: str, quota: Quota, used: int, reservation: Reservation | None) -> None:
        await self._store().settle_tokens.remote(identity, quota, used, reservation)

    async def ping(self) -> None:
        await self._store().ping.remote()

    def reset(self) -> None:
        self._actor = None


class StorageBackend(_CountsHere, Backend):
    """Counters in a `limits` storage used from this process (Redis in production)."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self.name = uri.split(":", 1)[0]
        self._counter = self._connect()

    def _connect(self) -> WindowCounter:
        options = {"implementation": "redispy"} if self.name.startswith("redis") else {}
        return WindowCounter(storage_from_string(f"async+{self._uri}", **options))

    async def ping(self) -> None:
        if not await self._counter.ping():
            raise ConnectionError(f"{self.name} storage does not answer")

    def reset(self) -> None:
        # A call cut off by the limiter's timeout can leave a redis-py connection half
        # read, failing every later call on it even once the server is back (seen: a
        # fail-closed app refusing for 20 s after Redis restarted). A new client starts
        # clean. Counters in this process's memory would be lost: they are kept.
        if self.name != "memory":
            self._counter = self._connect()


class StoreUnavailableError(Exception):
    """The counters could not be reached and the limiter is configured to fail closed."""


class RateLimiter:
    """Applies quotas through a backend, surviving its failures.

    Args:
        backend: where counters live.
        strategy: window strategy of request limits.
        fail_open: on a store failure let requests through (True) or refuse them.
        timeout_s: longest wait for the store before treating it as failed.
    """

    # How long a client's headroom, as last seen by this replica, is trusted.
    HEADROOM_TTL_S = 1.0

    def __init__(self, backend: Backend, strategy: str, fail_open: bool, timeout_s: float) -> None:
        self._backend = backend
        self._strategy = strategy
        self._fail_open = fail_open
        self._timeout_s = timeout_s
        self._failing = False
        self._background: set[asyncio.Task] = set()
        self._headroom_until: dict[str, float] = {}

    def has_headroom(self, identity: str) -> bool:
        """Whether this replica saw, within the last second, that ``identity`` is far
        from every limit (see `Decision.headroom`)."""
        return self._headroom_until.get(identity, 0.0) > time.monotonic()

    def _remember_headroom(self, identity: str, decision: Decision) -> None:
        now = time.monotonic()
        if decision.allowed and decision.headroom:
            if len(self._headroom_until) > 10_000:
                self._headroom_until = {k: t for k, t in self._headroom_until.items() if t > now}
            self._headroom_until[identity] = now + self.HEADROOM_TTL_S
        else:
            self._headroom_until.pop(identity, None)

    async def connect(self, timeout_s: float = 60) -> bool:
        """Waits for the store once at start (a new actor needs a worker process, which
        takes longer than a request may wait). Returns whether it answered; if not,
        requests are handled as the store failing until it does."""
        try:
            await asyncio.wait_for(self._backend.ping(), timeout_s)
            return True
        except Exception as exc:  # noqa: BLE001 - reported, then handled per request
            self._backend.reset()
            logger.warning("rate-limit store (%s) did not answer at start: %r", self._backend.name, exc)
            return False

    async def admit(self, identity: str, quota: Quota, tokens_needed: int | None = 0) -> Decision:
        """Counts a request against ``quota`` and reserves ``tokens_needed`` against its
        token quotas; refuses it when a limit is exhausted or the tokens do not fit.

        Raises:
            StoreUnavailableError: the store failed and ``fail_open`` is off.
        """
        if quota.unlimited:
            return Decision(True)
        decision = await self._call(self._backend.admit(identity, quota, self._strategy, tokens_needed))
        if decision is None:
            self._headroom_until.pop(identity, None)
            if not self._fail_open:
                raise StoreUnavailableError()
            return Decision(True)
        self._remember_headroom(identity, decision)
        return decision

    async def peek(self, identity: str, quota: Quota) -> LimitState | None:
        """The client's standing without counting anything (for the headers). None
        while the store is failing: admit() already waited for it on this request, and
        its next call finds out when it is back."""
        if not quota.requests or self._failing:
            return None
        return await self._call(self._backend.peek(identity, quota, self._strategy))

    def settle_tokens(self, identity: str, quota: Quota, used: int, reservation: Reservation | None) -> None:
        """Settles a finished request's tokens against its reservation, off the
        request's path (a task of its own: it survives a cancelled caller)."""
        if not quota.tokens or (used <= 0 and reservation is None):
            return
        task = asyncio.get_running_loop().create_task(
            self._call(self._backend.settle_tokens(identity, quota, used, reservation))
        )
        self._background.add(task)  # keep a reference until done
        task.add_done_callback(self._background.discard)

    async def _call(self, call):
        try:
            result = await asyncio.wait_for(call, self._timeout_s)
        except Exception as exc:  # noqa: BLE001 - any store failure is handled alike
            metrics.record_rate_limiter_error(self._backend.name)
            self._backend.reset()
            if not self._failing:
                self._failing = True
                action = "letting requests through" if self._fail_open else "refusing requests"
                logger.warning(
                    "rate-limit store (%s) unreachable, %s until it answers: %r",
                    self._backend.name, action, exc,
                )
            return None
        if self._failing:
            self._failing = False
            logger.warning("rate-limit store (%s) answers again", self._backend.name)
        return result

    async def wait_for_settlements(self) -> None:
        """Waits for pending token settlements (tests and shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
