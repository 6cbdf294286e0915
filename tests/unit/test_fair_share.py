"""Fair share of the batch across tenants (the scheduler's FairQueue), on the tiny
model with one row, so that the order requests get it is the order they finish: a
quiet tenant's request goes ahead of a noisy tenant's backlog, weights share rows in
proportion, one tenant alone keeps arrival order, priority orders a tenant's own line;
`fifo` serves in arrival order; `max_rows_per_tenant` keeps a row for the others. No
timing in the assertions: only orders and counts."""

import asyncio

import pytest

from deployments.config import ModelConfig
from deployments.protocol import GenerationParams
from deployments.transformers_engine import TransformersEngine


def started_engine(model_dir, **config):
    engine = TransformersEngine(ModelConfig(name="tiny", source=str(model_dir), dtype="float32",
                                            stream_interval_s=0, **{"max_batch_size": 1, **config}), "cpu")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def one_row(tiny_model_dir):
    engine = started_engine(tiny_model_dir)
    yield engine
    engine.close()


def request(tenant: str, weight: float = 1.0, tokens: int = 4, priority: int = 0, label: str = "") -> GenerationParams:
    return GenerationParams(prompt=f"Hello from {tenant}", max_new_tokens=tokens, temperature=0, tenant=tenant,
                            tenant_weight=weight, priority=priority, request_id=label or tenant)


def finishing_order(engine, blocker: GenerationParams, queued: list[GenerationParams]) -> list[str]:
    """The request ids of ``queued`` (the tenant's name unless given) in the order they
    finish, all sent while ``blocker`` holds a row (so they all wait in line together);
    the blocker's id is among them."""
    finished: list[str] = []

    async def one(params):
        async for _ in engine.generate(engine.prepare(params)):
            pass
        finished.append(params.request_id)

    async def scenario():
        decoding = asyncio.Event()

        async def block():
            async for _ in engine.generate(engine.prepare(blocker)):
                decoding.set()
            finished.append(blocker.request_id)

        held = asyncio.ensure_future(block())
        await decoding.wait()
        await asyncio.gather(*(one(params) for params in queued))
        await held

    asyncio.run(scenario())
    return finished


def test_a_quiet_tenants_request_goes_ahead_of_a_noisy_tenants_backlog(one_row):
    order = finishing_order(one_row, request("noisy", tokens=30, label="blocker"),
                            [request("noisy")] * 4 + [request("quiet")])
    assert order[:2] == ["blocker", "quiet"], order  # first come, first served would make it last


def test_rows_go_to_saturating_tenants_in_proportion_to_their_weights(one_row):
    queued = [request("light", 1.0)] * 8 + [request("heavy", 3.0)] * 8
    order = finishing_order(one_row, request("other", tokens=20), queued)[1:]
    assert order[:8].count("heavy") == 6, order  # 3 of every 4 while both wait


def test_one_tenant_keeps_arrival_order(one_row):
    queued = [GenerationParams(prompt=f"Request {n}", max_new_tokens=2 + n, temperature=0, tenant="alone")
              for n in range(5)]
    finished: list[int] = []

    async def scenario():
        async def one(n, params):
            async for _ in one_row.generate(one_row.prepare(params)):
                pass
            finished.append(n)

        await asyncio.gather(*(one(n, params) for n, params in enumerate(queued)))

    asyncio.run(scenario())
    assert finished == [0, 1, 2, 3, 4]


def test_priority_orders_a_tenants_own_line(one_row):
    queued = [request("a", priority=p, label=f"priority {p}") for p in (5, 0, -1)] + [request("b")]
    order = finishing_order(one_row, request("a", tokens=20, label="blocker"), queued)
    assert order == ["blocker", "b", "priority -1", "priority 0", "priority 5"], order  # b owes least


def test_first_come_first_served_when_the_policy_is_fifo(tiny_model_dir):
    engine = started_engine(tiny_model_dir, scheduling_policy="fifo")
    try:
        queued = [request("noisy", label=f"noisy {n}") for n in range(4)] + [request("quiet")]
        order = finishing_order(engine, request("noisy", tokens=30, label="blocker"), queued)
    finally:
        engine.close()
    assert order == ["blocker", "noisy 0", "noisy 1", "noisy 2", "noisy 3", "quiet"], order


def test_a_tenant_at_its_row_cap_waits_while_a_row_is_free(tiny_model_dir):
    engine = started_engine(tiny_model_dir, max_batch_size=2, max_rows_per_tenant=1)
    try:
        order = finishing_order(engine, request("a", tokens=30, label="blocker"), [request("a", label="a again")])
    finally:
        engine.close()
    assert order == ["blocker", "a again"], order  # it could start only when the blocker's row freed
