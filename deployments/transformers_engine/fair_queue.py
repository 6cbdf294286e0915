"""The lines of requests waiting for a row of the batch: fair across tenants.

Each tenant (an API key, or a client address when keys are off) has its own line,
ordered by the request's ``priority`` (lower first, vLLM's convention), then by
arrival. Between tenants, start-time fair queuing (SFQ; Goyal et al., 1996) on tokens
decides: a line's head is tagged with the later of the virtual time (the tag last
taken) and where the tenant's previous request ended (that request's tag plus its
cost, prompt plus every sequence's new tokens, over the tenant's weight); the lowest
tag goes next (ties: the smaller request's end, then the line that waited longer).
So under contention each tenant's share of tokens follows its weight; a quiet
tenant's request, tagged at the virtual time, goes ahead of a noisy tenant's
backlog; a tenant alone gets every row (nothing waits while a row is free); and a
tenant that was idle starts level with the others, with no credit saved up. Debts
last while the engine is busy: when it holds no request (`forget_debts`), every
tenant starts level again.

The queue knows nothing of models or rows: the scheduler asks for the next request
(passing over lines it cannot serve now) and takes it or leaves it in place.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import deque
from collections.abc import Collection, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

# Tenants whose lines emptied are remembered (their last finish tag: a tenant cannot
# skip its debt by pausing between requests) while the engine is busy; once there are
# more than this many, some are forgotten (`_forget_idle_tenants`).
REMEMBERED_TENANTS = 10_000


@dataclasses.dataclass(order=True)
class _Entry(Generic[T]):
    priority: int
    arrival: int
    item: T = dataclasses.field(compare=False)
    cost: float = dataclasses.field(compare=False)
    weight: float = dataclasses.field(compare=False)


@dataclasses.dataclass
class _Tenant(Generic[T]):
    line: list[_Entry[T]] = dataclasses.field(default_factory=list)  # a heap
    start_tag: float = 0.0  # of its head request, while its line is not empty
    since: int = 0  # when the line got that tag (ties go to the line that waited longer)
    finish_tag: float = 0.0  # where its last taken request ends


class FairQueue(Generic[T]):
    """Waiting items in lines: one per tenant, taken in fair order (``fair=True``), or
    one for all by priority and arrival (``fair=False``: first come, first served).

    ``peek`` names the next item and its line; ``take`` removes it (and charges the
    line); ``put_back_first`` returns taken items to the front, before the lines,
    uncharged a second time (a failed prefill's requests, retried one by one).
    """

    def __init__(self, fair: bool = True) -> None:
        self.fair = fair
        self._tenants: dict[str, _Tenant[T]] = {}
        self._first: deque[tuple[str, T]] = deque()
        self._events = itertools.count()  # orders arrivals and tags
        self._virtual_time = 0.0
        self._size = 0

    def __len__(self) -> int:
        return self._size + len(self._first)

    def __iter__(self) -> Iterator[T]:
        """Every waiting item, in no particular order."""
        yield from (item for _, item in self._first)
        for tenant in self._tenants.values():
            yield from (entry.item for entry in tenant.line)

    def line_of(self, tenant: str) -> str:
        return tenant if self.fair else ""

    def push(self, item: T, tenant: str, cost: float, weight: float = 1.0, priority: int = 0) -> None:
        """Puts ``item`` in ``tenant``'s line; ``cost`` in tokens, ``weight`` > 0."""
        name = self.line_of(tenant)
        state = self._tenants.get(name)
        if state is None or not state.line:
            state = self._tenants.setdefault(name, _Tenant())
            state.start_tag, state.since = max(state.finish_tag, self._virtual_time), next(self._events)
        heapq.heappush(state.line, _Entry(priority, next(self._events), item, cost, max(weight, 1e-6)))
        self._size += 1

    def peek(self, skip: Collection[str] = ()) -> tuple[str, T] | None:
        """The next item and its line, passing over the lines in ``skip``; None when
        nothing else waits."""
        for line, item in self._first:
            if line not in skip:
                return line, item
        best: tuple[float, float, int, str] | None = None
        for name, state in self._tenants.items():
            if state.line and name not in skip:
                head = state.line[0]
                candidate = (state.start_tag, state.start_tag + head.cost / head.weight, state.since, name)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        return best[-1], self._tenants[best[-1]].line[0].item

    def take(self, line: str) -> T:
        """Removes and returns the item ``peek`` named for ``line`` and charges the line
        for it (not for one put back first: it was charged when first taken)."""
        for position, (first_line, item) in enumerate(self._first):
            if first_line == line:
                del self._first[position]
                return item
        state = self._tenants[line]
        entry = heapq.heappop(state.line)
        self._size -= 1
        self._virtual_time = max(self._virtual_time, state.start_tag)
        state.finish_tag = state.start_tag + entry.cost / entry.weight
        if state.line:
            state.start_tag, state.since = state.finish_tag, next(self._events)
        elif len(self._tenants) > REMEMBERED_TENANTS:
            self._forget_idle_tenants()
        return entry.item

    def forget_debts(self) -> None:
        """The engine holds no request (none waits, none runs): nobody is behind
        anybody, and every tenant starts level again."""
        if not len(self):
            self._tenants.clear()
            self._virtual_time = 0.0

    def _forget_idle_tenants(self) -> None:
        """Forgets tenants with empty lines whose debt the virtual time has passed (their
        next tag is the virtual time anyway); if still too many, those that owe least,
        down to half the limit (each then owes at most its last request: one-shot
        clients, many addresses, while requests keep waiting)."""
        idle = sorted(
            (tenant.finish_tag, name) for name, tenant in self._tenants.items()
            if not tenant.line
        )
        owing = [(tag, name) for tag, name in idle if tag > self._virtual_time]
        keep = {name for _, name in owing[len(owing) - REMEMBERED_TENANTS // 2:]} if owing else set()
        self._tenants = {name: tenant for name, tenant in self._tenants.items() if tenant.line or name in keep}

    def put_back_first(self, taken: list[tuple[str, T]]) -> None:
        """Returns taken ``(tenant, item)`` pairs to the very front, in their order."""
        self._first.extendleft((self.line_of(tenant), item) for tenant, item in reversed(taken))
