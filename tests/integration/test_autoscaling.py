"""Autoscaling seen end to end on a simulated GPU cluster (bench/simulated_cluster.py):
cluster.yaml's node types on this machine, with no GPU node at start; Ray's fake
multi-node autoscaler launches a GPU node for each model replica Serve asks for and
terminates it when idle. The model is the tiny one, each replica reserving a GPU and
computing on the CPU, under configs/serve.simulated.yaml with smaller targets.

The cluster is Ray's own, started and stopped by the test (its processes share a session
id); the test talks to it over HTTP only, so it runs beside the other tests' cluster.
The two tests run in order on one cluster: scaling out and in, then scale to zero.
"""

import asyncio
import threading

import httpx
import pytest

from bench.simulated_cluster import SimulatedCluster, Timeline, closed_loop, load_serve_config
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

APP, DEPLOYMENT = "textgen", "Model-tiny"
# One replica holds at most 4 sequences; the load below keeps 10 long ones in flight.
MODEL = {
    "name": "tiny",
    "max_batch_size": 4,
    "max_ongoing_requests": 8,
    "max_queued_requests": 8,
    "autoscaling": {
        "target_sequences": 4, "target_token_backlog": 400, "downscale_delay_s": 8, "downscale_to_zero_delay_s": 15,
    },
}
LONG = {"prompt": "Tell me a long story", "max_new_tokens": 200}
# Generous: every stage takes 10-20 s on 2 cores (node start, replica load, delays).
STAGE_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def simulated(tiny_model_dir):
    port = free_port()
    config = load_serve_config(port=port, source=str(tiny_model_dir), **MODEL)
    with SimulatedCluster(max_gpu_workers=2) as cluster, Timeline(cluster, APP, DEPLOYMENT) as timeline:
        yield cluster, timeline, config, f"http://127.0.0.1:{port}"


def serving_replicas(cluster: SimulatedCluster) -> dict[str, int]:
    """Replicas that have answered at least one request, with their counts."""
    return {replica: n for replica, n in cluster.requests_per_replica(APP, DEPLOYMENT).items() if n}


def test_gpu_nodes_and_replicas_follow_the_load(simulated):
    cluster, timeline, config, url = simulated
    assert not cluster.gpu_nodes(), "the simulation starts with no GPU worker"

    cluster.deploy(config)
    cluster.wait_for(lambda: cluster.app_status(APP) == "RUNNING", STAGE_TIMEOUT_S, "the application to run")
    first = httpx.post(f"{url}/generate", json={"prompt": "Hello", "max_new_tokens": 8}, timeout=60)
    assert first.status_code == 200, first.text
    [node] = cluster.gpu_nodes()
    [replica] = cluster.replicas(APP, DEPLOYMENT)
    assert replica["node_id"] == node["node_id"], "the replica runs on the GPU node launched for it"

    stop, outcomes = threading.Event(), []
    loader = threading.Thread(target=lambda: outcomes.extend(asyncio.run(closed_loop(url, [LONG] * 10, stop))))
    load_started = timeline.now()
    loader.start()
    try:
        # The load shows in what replicas report, as Prometheus would scrape it: 10
        # requests owing up to 200 tokens each, beyond one replica's target of 400.
        cluster.wait_for(
            lambda: max((value for _, value in cluster.metrics("ray_textgen_token_backlog")), default=0) > 400,
            STAGE_TIMEOUT_S, "a token backlog over the target in the metrics",
        )
        cluster.wait_for(lambda: len(serving_replicas(cluster)) == 2, STAGE_TIMEOUT_S, "a second replica serving")
    finally:
        stop.set()
        loader.join()
    load_stopped = timeline.now()
    assert timeline.first_time("gpu_nodes", 2, after=load_started) is not None, "a second GPU node was launched"
    replicas = cluster.replicas(APP, DEPLOYMENT)
    assert len({r["node_id"] for r in replicas}) == 2, "one replica per GPU node"

    statuses = [o.status for o in outcomes]
    errors = [o.error for o in outcomes if o.error][:3]
    assert statuses and set(statuses) <= {200, 503}, f"connection errors or failures: {set(statuses)} {errors}"
    assert all(o.retry_after for o in outcomes if o.status == 503), "a 503 says when to retry"
    assert statuses.count(200) >= 10

    # Idle: the second replica goes after downscale_delay_s, then its node.
    cluster.wait_for(lambda: timeline.first_time("gpu_nodes", 1, after=load_stopped) is not None,
                     STAGE_TIMEOUT_S, "the idle GPU node to be terminated")
    assert timeline.first_time("running_replicas", 1, after=load_stopped) is not None


def test_an_idle_model_scales_to_zero_and_the_next_request_waits_for_a_replica(simulated):
    cluster, timeline, _, url = simulated
    cluster.wait_for(lambda: timeline.latest("running_replicas") == 0 and timeline.latest("gpu_nodes") == 0,
                     STAGE_TIMEOUT_S, "no replica and no GPU node")
    ready = httpx.get(f"{url}/readyz", timeout=10)
    assert ready.status_code == 200, "a model scaled to zero can still serve: readiness holds"
    assert ready.json()["models"]["tiny"]["running_replicas"] == 0
    assert timeline.latest("gpu_nodes") == 0, "readiness probes never wake the model"

    # More requests than the ingress queues for the model (max_queued_requests 8) arrive
    # while no replica exists: those queued wait for the replica Serve starts for them.
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(
                client.post(f"{url}/generate", json={"prompt": f"Anyone there? {i}", "max_new_tokens": 8})
                for i in range(12)
            ))

    idle_since = timeline.now()
    responses = asyncio.run(burst())
    statuses = sorted(response.status_code for response in responses)
    print(f"12 requests at zero replicas: {statuses}")
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 8, statuses
    for response in responses:
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == 8
        else:
            assert response.headers["Retry-After"]
    assert timeline.first_time("gpu_nodes", 1, after=idle_since) is not None, "a GPU node was launched for them"
