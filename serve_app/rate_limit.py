"""Rate limits and token quotas that hold across every ingress replica.

The counting is the `limits` package's (moving/sliding/fixed windows, cost per hit);
this module chooses where its state lives so that all replicas share it:

- ``ray`` (default): a named, detached Ray actor per application holds a `limits`
  MemoryStorage; each request costs one actor call (about 1.6 ms idle on 2 cores).
  Ray restarts the actor if it dies (its counts start again from zero).
- ``redis://...``: Redis, used directly from each replica: request limits through
  `limits`' Redis storage (each hit one atomic script), token quotas through
  `RedisTokenLedger` (check-and-reserve over every window in one Lua script).

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


# A limit and the identity it is counted under.
Limit = tuple[str, RateLimitItem]


@dataclasses.dataclass(frozen=True)
class Quota:
    """What one client may spend: request limits and token limits (limits' notation,
    e.g. ``10/minute``). Empty means unlimited. ``scoped``: quotas that apply as well,
    each counted under the client's identity with a suffix (a model's own quota, per
    client and model: ``" on <model>"``); a request must fit every one of them."""

    requests: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    scoped: tuple[tuple[str, Quota], ...] = ()
    weight: float = 1.0  # the client's share of a model replica's batch (not a limit)

    @property
    def unlimited(self) -> bool:
        return not self.requests and not self.tokens and all(quota.unlimited for _, quota in self.scoped)

    def request_limits(self, identity: str) -> list[Limit]:
        return [(identity, parse_limit(text)) for text in self.requests] + [
            limit for suffix, quota in self.scoped for limit in quota.request_limits(identity + suffix)
        ]

    def token_limits(self, identity: str) -> list[Limit]:
        return [(identity, parse_limit(text)) for text in self.tokens] + [
            limit for suffix, quota in self.scoped for limit in quota.token_limits(identity + suffix)
        ]


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
    refused_for: str = ""  # when refused, the identity the refusing limit counts (a client, or a client on a model)


@dataclasses.dataclass(frozen=True)
class Reservation:
    """Tokens an admitted request holds against its client's token quotas: its worst
    case (prompt + every sequence's new tokens), charged at admission so that
    concurrent requests cannot overdraw the quota together. ``windows`` names the
    window of each quota (in order) that held them, so that a refund goes back to that
    window and only there: when it ended (Ray actor store) or began (Redis)."""

    tokens: int
    windows: tuple[float, ...]


def far_from_spent(remaining: float, limit: int) -> bool:
    """At least 10% of a limit (and two units) left."""
    return remaining >= max(2, 0.1 * limit)


@dataclasses.dataclass(frozen=True)
class Reserved:
    """What a `TokenLedger.reserve` did. ``reservation``: None when refused or when
    nothing was charged (0 tokens). ``standings``: each quota's after the charge; when
    refused, the refusing quota's alone."""

    allowed: bool
    reservation: Reservation | None
    standings: tuple[LimitState, ...]
    refused_by: int = 0  # when refused, which of the limits refused


class TokenLedger(abc.ABC):
    """Token quotas: fixed windows whose counters record a charge even when it
    overdraws the quota, so a client stays stopped until its window renews."""

    @abc.abstractmethod
    async def reserve(self, limits: list[Limit], tokens: int) -> Reserved:
        """Charges ``tokens`` to every quota at once if each has them left (at least
        one token left when ``tokens`` is 0), else charges nothing."""

    @abc.abstractmethod
    async def settle(self, limits: list[Limit], used: int, reservation: Reservation | None) -> None:
        """Charges what a request used against what it reserved: the unused part goes
        back to the window that held it (if that window still runs), and tokens past
        the reservation are charged to the current window."""


class LimitsTokenLedger(TokenLedger):
    """Token quotas in a `limits` storage whose calls never suspend between the check
    and the charge (MemoryStorage, in the Ray actor: one request at a time)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._windows = FixedWindowRateLimiter(storage)

    async def reserve(self, limits: list[Limit], tokens: int) -> Reserved:
        for number, (identity, item) in enumerate(limits):
            if not await self._windows.test(item, "tokens", identity, cost=max(1, tokens)):
                return Reserved(False, None, (await _state(self._windows, item, "tokens", identity),), number)
        ends = []
        for identity, item in limits if tokens else ():
            await self._windows.hit(item, "tokens", identity, cost=tokens)
            ends.append(await self._storage.get_expiry(item.key_for("tokens", identity)))
        standings = tuple([await _state(self._windows, item, "tokens", identity) for identity, item in limits])
        return Reserved(True, Reservation(tokens, tuple(ends)) if tokens else None, standings)

    async def settle(self, limits: list[Limit], used: int, reservation: Reservation | None) -> None:
        reserved = reservation.tokens if reservation else 0
        for number, (identity, item) in enumerate(limits):
            key = item.key_for("tokens", identity)
            # MemoryStorage keeps a window's end as set when it began: the same window
            # answers the same end.
            same_window = reservation is not None and await self._storage.get_expiry(key) == reservation.windows[number]
            owed = used - reserved if same_window or used > reserved else 0
            if owed > 0:
                await self._windows.hit(item, "tokens", identity, cost=owed)
            elif owed < 0:
                await self._storage.incr(key, item.get_expiry(), amount=owed)


# KEYS: one key prefix per quota. ARGV: the tokens, then per quota its amount and window
# seconds. Windows are aligned on the server's clock (one clock for every replica),
# each named by its start. Returns {1, start, used after, ...} or {0, refusing quota's
# number, used, start}.
_RESERVE = """
local now = redis.call('TIME')
local at = tonumber(now[1]) + tonumber(now[2]) / 1000000
local tokens = tonumber(ARGV[1])
local starts, used = {}, {}
for i = 1, #KEYS do
  local seconds = tonumber(ARGV[2 * i + 1])
  starts[i] = math.floor(at / seconds) * seconds
  used[i] = tonumber(redis.call('GET', KEYS[i] .. starts[i]) or '0')
  if used[i] + math.max(1, tokens) > tonumber(ARGV[2 * i]) then
    return {0, i, used[i], starts[i]}
  end
end
local answer = {1}
for i = 1, #KEYS do
  if tokens > 0 then
    used[i] = redis.call('INCRBY', KEYS[i] .. starts[i], tokens)
    redis.call('EXPIRE', KEYS[i] .. starts[i], tonumber(ARGV[2 * i + 1]) + 1)
  end
  table.insert(answer, starts[i])
  table.insert(answer, used[i])
end
return answer
"""

# KEYS: one key prefix per quota. ARGV: used, reserved, then per quota the reservation's
# window start (-1: none) and the window seconds.
_SETTLE = """
local now = redis.call('TIME')
local at = tonumber(now[1]) + tonumber(now[2]) / 1000000
local used, reserved = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  local held, seconds = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  local current = math.floor(at / seconds) * seconds
  local owed = 0
  if held == current or used > reserved then owed = used - reserved end
  if owed > 0 then
    redis.call('INCRBY', KEYS[i] .. current, owed)
    redis.call('EXPIRE', KEYS[i] .. current, seconds + 1)
  elseif owed < 0 and redis.call('EXISTS', KEYS[i] .. held) == 1 then
    redis.call('DECRBY', KEYS[i] .. held, -owed)
  end
end
return 1
"""


class RedisTokenLedger(TokenLedger):
    """Token quotas in Redis, checked and reserved in one script over every window, so
    that ingress replicas racing for the last tokens cannot both take them; the
    reservation names each window by its start, and a refund goes to that window's key
    while it still exists (and the window still runs)."""

    def __init__(self, uri: str) -> None:
        import redis.asyncio  # only a Redis store needs it

        self._client = redis.asyncio.Redis.from_url(uri)
        self._reserve = self._client.register_script(_RESERVE)
        self._settle = self._client.register_script(_SETTLE)

    @staticmethod
    def _prefixes(limits: list[Limit]) -> list[str]:
        return [f"textgen:tokens:{identity}:{item.amount}/{item.get_expiry()}s:" for identity, item in limits]

    async def reserve(self, limits: list[Limit], tokens: int) -> Reserved:
        windows = [arg for _, item in limits for arg in (item.amount, item.get_expiry())]
        answer = [int(value) for value in await self._reserve(self._prefixes(limits), [tokens, *windows])]
        now = time.time()
        if answer[0] == 0:
            _, number, used, start = answer
            item = limits[number - 1][1]
            return Reserved(False, None, (_standing(item, used, start + item.get_expiry() - now),), number - 1)
        starts, used = answer[1::2], answer[2::2]
        standings = tuple(
            _standing(item, spent, start + item.get_expiry() - now)
            for (_, item), start, spent in zip(limits, starts, used, strict=True)
        )
        return Reserved(True, Reservation(tokens, tuple(starts)) if tokens else None, standings)

    async def settle(self, limits: list[Limit], used: int, reservation: Reservation | None) -> None:
        held = reservation.windows if reservation else (-1,) * len(limits)
        windows = [arg for (_, item), start in zip(limits, held, strict=True) for arg in (int(start), item.get_expiry())]
        reserved = reservation.tokens if reservation else 0
        await self._settle(self._prefixes(limits), [used, reserved, *windows])


class WindowCounter:
    """Runs `limits` strategies over one storage for request limits (the configured
    strategy), and a `TokenLedger` for token quotas."""

    def __init__(self, storage: Storage, ledger: TokenLedger | None = None) -> None:
        self._strategies: dict[str, WindowLimiter] = {
            name: cls(storage) for name, cls in STRATEGIES.items()
        }
        self._storage = storage
        self._ledger = ledger or LimitsTokenLedger(storage)

    async def admit(self, identity: str, quota: Quota, strategy: str, tokens_needed: int | None = 0) -> Decision:
        """Reserves ``tokens_needed`` against every token quota and counts a request,
        or refuses it (nothing left counted) when a limit is spent or the reservation
        does not fit. The reservation is one step of the ledger (see `TokenLedger`), so
        concurrent requests cannot both take the last tokens; a request that a request
        limit then refuses gives its reservation back."""
        requests = self._strategies[strategy]
        token_limits = quota.token_limits(identity) if tokens_needed is not None else []
        reservation, standings = None, ()
        if token_limits:
            reserved = await self._ledger.reserve(token_limits, tokens_needed or 0)
            if not reserved.allowed:
                refused_for = token_limits[reserved.refused_by][0]
                return Decision(False, reserved.standings[0], refused_tokens=True, refused_for=refused_for)
            reservation, standings = reserved.reservation, reserved.standings
        request_limits = quota.request_limits(identity)
        # Tested first, then counted: a request one limit refuses counts against none
        # (in the actor nothing runs between; on Redis each count is atomic on its own,
        # so a request that loses a race between them may cost a count it was refused on).
        refusing = None
        for held_by, item in request_limits if len(request_limits) > 1 else ():  # one alone: its count is its test
            if not await requests.test(item, "requests", held_by):
                refusing = held_by, item
                break
        for held_by, item in request_limits if refusing is None else ():
            if not await requests.hit(item, "requests", held_by):
                refusing = held_by, item
                break
        if refusing is not None:
            if reservation is not None:
                await self._ledger.settle(token_limits, 0, reservation)
            held_by, item = refusing
            return Decision(False, await _state(requests, item, "requests", held_by), refused_for=held_by)
        tightest = await self._tightest(identity, quota, strategy)
        headroom = tightest is None or far_from_spent(tightest.remaining, tightest.limit)
        headroom = headroom and all(far_from_spent(standing.remaining, standing.limit) for standing in standings)
        return Decision(True, tightest, headroom, reservation=reservation)

    async def peek(self, identity: str, quota: Quota, strategy: str) -> LimitState | None:
        return await self._tightest(identity, quota, strategy)

    async def ping(self) -> bool:
        return await self._storage.check()

    async def settle_tokens(self, identity: str, quota: Quota, used: int, reservation: Reservation | None) -> None:
        await self._ledger.settle(quota.token_limits(identity), used, reservation)

    async def _tightest(self, identity: str, quota: Quota, strategy: str) -> LimitState | None:
        states = [
            await _state(self._strategies[strategy], item, "requests", held_by)
            for held_by, item in quota.request_limits(identity)
        ]
        return min(states, key=lambda s: (s.remaining / s.limit, -s.reset_after_s), default=None)


def _window_name(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    return unit if item.multiples == 1 else f"{item.multiples} {unit}s"


def _standing(item: RateLimitItem, used: int, reset_after_s: float) -> LimitState:
    return LimitState(item.amount, item.amount - used, reset_after_s, _window_name(item))


async def _state(strategy: WindowLimiter, item: RateLimitItem, *key: str) -> LimitState:
    stats = await strategy.get_window_stats(item, *key)
    return LimitState(item.amount, stats.remaining, stats.reset_time - time.time(), _window_name(item))


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
        if not self.name.startswith("redis"):
            return WindowCounter(storage_from_string(f"async+{self._uri}"))
        storage = storage_from_string(f"async+{self._uri}", implementation="redispy")
        return WindowCounter(storage, RedisTokenLedger(self._uri))

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
        self._standings: dict[str, tuple[float, LimitState]] = {}  # the last seen, and when

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
        self._remember_standing(identity, decision.state)
        return decision

    async def peek(self, identity: str, quota: Quota) -> LimitState | None:
        """The client's standing without counting anything (for the headers): as this
        replica saw it within the last second, else from the store (so a flood of
        requests that count nothing costs the store one call a second per client).
        None while the store is failing: admit() already waited for it on this
        request, and its next call finds out when it is back."""
        if not quota.request_limits("") or self._failing:
            return None
        recent = self.last_standing(identity, self.HEADROOM_TTL_S)
        if recent is not None:
            return recent
        standing = await self._call(self._backend.peek(identity, quota, self._strategy))
        self._remember_standing(identity, standing)
        return standing

    def last_standing(self, identity: str, within_s: float = math.inf) -> LimitState | None:
        """The client's standing as this replica last saw it (its reset moved on by the
        time since), if within ``within_s`` and its window has not renewed since;
        never a store call."""
        seen = self._standings.get(identity)
        if seen is None:
            return None
        age = time.monotonic() - seen[0]
        state = seen[1]
        if age > within_s or age >= state.reset_after_s:
            return None
        return dataclasses.replace(state, reset_after_s=state.reset_after_s - age)

    def _remember_standing(self, identity: str, state: LimitState | None) -> None:
        if state is None:
            return
        now = time.monotonic()
        if len(self._standings) > 10_000:
            self._standings = {k: v for k, v in self._standings.items() if now - v[0] < v[1].reset_after_s}
        self._standings[identity] = (now, state)

    def settle_tokens(self, identity: str, quota: Quota, used: int, reservation: Reservation | None) -> None:
        """Settles a finished request's tokens against its reservation, off the
        request's path (a task of its own: it survives a cancelled caller)."""
        if not quota.token_limits("") or (used <= 0 and reservation is None):
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
