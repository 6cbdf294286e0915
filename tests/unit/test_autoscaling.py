"""The generation autoscaling policy and the load a model replica reports to it.

The policy runs in Serve's controller; here it gets Serve's own AutoscalingContext, and
Serve's own config resolves it from the path the app builder writes. The end-to-end
story (a simulated GPU cluster adding and removing replicas and nodes) is
tests/integration/test_autoscaling.py.
"""

import asyncio
import time

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import SEQUENCES, TOKEN_BACKLOG, GenerationLoadPolicy, GenerationLoadReport
from deployments.config import ModelConfig
from deployments.engine import prepare_request
from deployments.model_server import GenerationLoad, ModelServer
from deployments.protocol import GenerationParams, SequenceDelta
from serve_app.args import AutoscalingArgs
from tests.fakes import FAKE_ENGINE, fake_source

DEPLOYMENT = DeploymentID(name="Model-m", app_name="app")


def context(replicas: int, per_replica: list[tuple[float, float]] | None, requests=0.0, queued=0.0, target=None):
    """Serve's context for ``replicas`` running replicas, each reporting (sequences,
    token backlog) averaged over the window (None: no report yet)."""
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(replicas)]
    reported = None
    if per_replica is not None:
        reported = {
            SEQUENCES: {replica: load[0] for replica, load in zip(ids, per_replica, strict=True)},
            TOKEN_BACKLOG: {replica: load[1] for replica, load in zip(ids, per_replica, strict=True)},
        }
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name=DEPLOYMENT.name, app_name=DEPLOYMENT.app_name,
        current_num_replicas=replicas, target_num_replicas=replicas if target is None else target,
        running_replicas=ids, total_num_requests=requests, total_queued_requests=queued,
        aggregated_metrics=reported, raw_metrics=None, capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=None, config=None,
    )


POLICY = GenerationLoadPolicy(target_sequences=8, target_token_backlog=1000)


@pytest.mark.parametrize(
    "replicas, load, queued, wanted",
    [
        # 40 short requests: 40 sequences owing 16 tokens each; the sequences decide.
        (1, [(40, 40 * 16)], 0, 5),
        # 8 long requests fill one batch's rows but owe 8 x 500 tokens: the backlog decides.
        (1, [(8, 8 * 500)], 0, 4),
        # Two replicas, half full: one would do.
        (2, [(2, 200), (2, 200)], 0, 0.5),
        # Requests waiting at callers because every replica was full count as sequences.
        (2, [(8, 800), (8, 800)], 8, 3),
        (1, [(0, 0)], 0, 0),
    ],
)
def test_the_policy_wants_enough_replicas_for_both_targets(replicas, load, queued, wanted):
    assert POLICY(context(replicas, load, queued=queued)) == (pytest.approx(wanted), {})


def test_same_requests_in_flight_but_longer_ones_want_more_replicas():
    """What Serve's default cannot tell apart: 40 requests in flight either way."""
    short = POLICY(context(1, [(40, 40 * 16)], requests=40))[0]
    long = POLICY(context(1, [(40, 40 * 400)], requests=40))[0]
    assert long > short >= 40 / 8


def test_before_any_report_requests_in_flight_stand_in_for_sequences():
    assert POLICY(context(2, None, requests=24)) == (3, {})


def test_with_no_replica_running_the_policy_keeps_the_target():
    """Serve itself starts the first replica of a deployment scaled to zero as soon as a
    request waits; while replicas start, the policy must not undo the target."""
    assert POLICY(context(0, None, requests=0, target=2)) == (2, {})


def test_targets_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        GenerationLoadPolicy(target_sequences=0, target_token_backlog=10)


def test_serve_resolves_the_policy_the_builder_names():
    config = AutoscalingConfig(**AutoscalingArgs(target_token_backlog=640).to_serve_config(max_batch_size=4))
    policy_class = config.policy.get_policy()
    policy = policy_class(**config.policy.policy_kwargs)
    assert (policy.target_sequences, policy.target_token_backlog) == (8, 640)
    assert policy(context(1, [(4, 1280)])) == (2, {})


# The load a replica reports.


def prepared(prompt_tokens: int, max_new_tokens: int, n: int = 1):
    params = GenerationParams(prompt="x", max_new_tokens=max_new_tokens, num_return_sequences=n)
    return prepare_request(params, list(range(prompt_tokens)), context_length=4096)


def test_a_request_owes_its_prompt_until_its_first_step_then_its_remaining_tokens():
    load = GenerationLoad()
    with load.holding(prepared(prompt_tokens=30, max_new_tokens=10, n=2)) as owed:
        assert load.report() == GenerationLoadReport(running_sequences=0, waiting_sequences=2, token_backlog=30 + 2 * 10)
        owed.observe([SequenceDelta(0, "a", 1), SequenceDelta(1, "b", 1)])
        assert load.report() == GenerationLoadReport(2, 0, 2 * 9)
        owed.observe([SequenceDelta(0, "cd", 3, finish_reason="stop"), SequenceDelta(1, "", 4)])
        assert load.report() == GenerationLoadReport(1, 0, 6)
        assert owed.completion_tokens == 7 and not owed.all_finished
    assert load.report() == GenerationLoadReport(0, 0, 0)


def test_a_replica_reports_its_load_while_it_generates():
    """The real ModelServer (its engine process running the fake engine): what it tells
    Serve while a request is half done, and after it ends."""
    config = ModelConfig(name="m", source=fake_source(step_s=0.05), engine=FAKE_ENGINE)
    server = ModelServer(config, "cpu")
    try:
        async def half_way():
            stream = server.generate_stream(GenerationParams(prompt="abcd", max_new_tokens=40))
            await anext(stream)  # StreamStart
            for _ in range(10):
                [delta] = await anext(stream)
            during = await server.record_autoscaling_stats()
            await stream.aclose()  # the caller leaves
            return during, delta.completion_tokens

        during, generated = asyncio.run(half_way())
        assert generated >= 10
        assert during == {SEQUENCES: 1, TOKEN_BACKLOG: 40 - generated}
        assert asyncio.run(server.record_autoscaling_stats()) == {SEQUENCES: 0, TOKEN_BACKLOG: 0}
    finally:
        server.__del__()


def test_requests_waiting_for_a_batch_row_are_reported_waiting():
    """A replica with one row (the fake engine's batch): the second request waits."""
    config = ModelConfig(name="m", source=fake_source(step_s=0.02, rows=1), engine=FAKE_ENGINE)
    server = ModelServer(config, "cpu")
    try:
        async def two_at_once():
            first = server.generate_stream(GenerationParams(prompt="abc", max_new_tokens=30))
            second = server.generate_stream(GenerationParams(prompt="abcdef", max_new_tokens=30))
            await anext(first), await anext(second)  # both accepted (StreamStart)
            [delta] = await anext(first)
            waiting = asyncio.ensure_future(anext(second))  # asks the engine for its first step
            await asyncio.sleep(0.1)
            report = await server.record_autoscaling_stats()
            await first.aclose()
            await waiting  # the row is free now
            await second.aclose()
            return report, delta.completion_tokens

        report, generated = asyncio.run(two_at_once())
        # The first owes its remaining tokens; the second its prompt (6) and all 30 tokens.
        assert report == {SEQUENCES: 2, TOKEN_BACKLOG: (30 - generated) + (6 + 30)}
    finally:
        server.__del__()


def test_tokenizing_never_stalls_the_replicas_event_loop():
    """A request whose prompt takes 0.5 s to tokenize (a long chat through its
    template): the replica's event loop, which serves every other request, keeps
    running meanwhile."""
    config = ModelConfig(name="m", source=fake_source(prepare_s=0.5), engine=FAKE_ENGINE, engine_process=False)
    server = ModelServer(config, "cpu")
    try:
        async def scenario():
            gaps, last = [], time.perf_counter()

            async def heartbeat():
                nonlocal last
                while True:
                    await asyncio.sleep(0.01)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            beating = asyncio.ensure_future(heartbeat())
            result = await server.generate(GenerationParams(prompt="abc", max_new_tokens=3))
            beating.cancel()
            return result, max(gaps, default=float("inf"))  # none: it never got to run

        result, longest_gap = asyncio.run(scenario())
        assert result.completion_tokens == 3
        assert longest_gap < 0.25, f"the loop stalled {longest_gap:.2f} s"
    finally:
        server.__del__()
