"""A real local Ray cluster and Serve instance on 127.0.0.1, shared by the session."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import build_app
from serve_app.args import AppArgs, IngressArgs, ModelArgs, RateLimitArgs

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Cluster:
    serve_url: str
    metrics_url: str
    session_dir: Path


@pytest.fixture(scope="session")
def cluster():
    """Starts Ray (address="local": never joins another cluster) with its metrics agent
    on a known port, reporting every second, and Serve on a free port."""
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # read by the processes Ray starts
    metrics_port = free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    session_dir = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    yield Cluster(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", session_dir)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_base_url(cluster):
    return cluster.serve_url


def tiny_app_args(tiny_model_dir, **model_fields) -> AppArgs:
    fields = {
        "name": "tiny",
        "source": str(tiny_model_dir),
        "num_cpus": 0.5,
        "num_replicas": 1,
        "autoscaling": None,
        **model_fields,
    }
    # No rate limit: these tests send many requests from one address.
    return AppArgs(
        models=[ModelArgs(**fields)],
        ingress=IngressArgs(num_cpus=0.1),
        rate_limits=RateLimitArgs(enabled=False),
    )


def deploy(base_url: str, args: AppArgs, name: str) -> str:
    """Runs the app under route prefix /<name> and waits for every replica; returns its URL."""
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"{base_url}/{name}"


def deploy_in_background(base_url: str, args: AppArgs, name: str) -> tuple[str, threading.Thread]:
    """Like `deploy`, but `serve.run` waits on a thread so a test can watch the start;
    join the thread before deleting the app."""
    deploying = threading.Thread(
        target=serve.run,
        args=(build_app(args),),
        kwargs={"name": name, "route_prefix": f"/{name}"},
        daemon=True,
    )
    deploying.start()
    return f"{base_url}/{name}", deploying


@pytest.fixture(scope="session")
def tiny_url(serve_base_url, tiny_model_dir):
    """The tiny model behind the real builder, batching up to 8 sequences; the long
    batch wait makes concurrent requests land in one batch. Every step is handed over
    (stream_interval_s=0), so tests can count tokens by stream events."""
    args = tiny_app_args(tiny_model_dir, max_batch_size=8, batch_wait_timeout_s=0.3, stream_interval_s=0)
    url = deploy(serve_base_url, args, "tiny")
    yield url
    serve.delete("tiny")


def wait_for_status(url: str, status: int, timeout_s: float) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=5)
            if last.status_code == status:
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered {status}; last: {last and last.status_code}")
