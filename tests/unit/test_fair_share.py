"""Fair share of the batch across tenants (start-time fair queuing in the scheduler),
on the tiny model with one row, so that the order requests get it is the order they
finish: a quiet tenant's request goes ahead of a noisy tenant's backlog, weights share
rows in proportion, and one tenant alone keeps arrival order. No timing in the
assertions: only orders and counts."""

import asyncio

import pytest

from deployments.config import ModelConfig
from deployments.protocol import GenerationParams
from deployments.transformers_engine import TransformersEngine


@pytest.fixture(scope="module")
def one_row(tiny_model_dir):
    engine = TransformersEngine(ModelConfig(name="tiny", source=str(tiny_model_dir), dtype="float32",
                                            max_batch_size=1, stream_interval_s=0), "cpu")
    engine.load()
    yield engine
    engine.close()


def request(tenant: str, weight: float = 1.0, tokens: int = 4) -> GenerationParams:
    return GenerationParams(prompt=f"Hello from {tenant}", max_new_tokens=tokens, temperature=0, tenant=tenant,
                            tenant_weight=weight)


def finishing_order(engine, blocker: GenerationParams, queued: list[GenerationParams]) -> list[str]:
    """The tenants of ``queued`` in the order they finish, all sent while ``blocker``
    holds the one row (so they all wait in line together)."""
    finished: list[str] = []

    async def one(params):
        async for _ in engine.generate(engine.prepare(params)):
            pass
        finished.append(params.tenant)

    async def scenario():
        decoding = asyncio.Event()

        async def block():
            async for _ in engine.generate(engine.prepare(blocker)):
                decoding.set()

        held = asyncio.ensure_future(block())
        await decoding.wait()
        await asyncio.gather(*(one(params) for params in queued))
        await held

    asyncio.run(scenario())
    return finished


def test_a_quiet_tenants_request_goes_ahead_of_a_noisy_tenants_backlog(one_row):
    order = finishing_order(one_row, request("noisy", tokens=30), [request("noisy")] * 4 + [request("quiet")])
    assert order[0] == "quiet", order  # first come, first served would make it last


def test_rows_go_to_saturating_tenants_in_proportion_to_their_weights(one_row):
    queued = [request("light", 1.0)] * 8 + [request("heavy", 3.0)] * 8
    order = finishing_order(one_row, request("other", tokens=20), queued)
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
