"""Metrics through a real Prometheus, the Grafana dashboard against a real scrape, and a
request id followed across the ingress -> model hop."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray import serve

from serve_app.args import AppArgs, AutoscalingArgs, IngressArgs, ModelArgs, QuotaArgs, RateLimitArgs
from tests.integration.conftest import deploy, free_port, wait_for_status

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
MODEL = "observed-tiny"
PROMPT = "Count me in: one, two, three, four, five, six, seven, eight, nine, ten, eleven."


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    """Debian's prometheus with a copy of configs/prometheus.yml: the same scrape job,
    its service-discovery file pointed at the tests' cluster and a 1 s interval."""
    server = shutil.which("prometheus")
    assert server, "prometheus is needed (Debian package prometheus; .ci/run installs it)"
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    [job] = config["scrape_configs"]
    discovery = folder / "targets.json"
    discovery.write_text(json.dumps([{"targets": [cluster.metrics_url.split("/")[2]]}]))
    job["file_sd_configs"][0]["files"] = [str(discovery)]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [server, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_status(f"{url}/-/ready", 200, timeout_s=60)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus_url: str, expression: str) -> float | None:
    result = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expression}, timeout=10).json()
    assert result["status"] == "success", result
    vector = result["data"]["result"]
    return float(vector[0]["value"][1]) if vector else None


def wait_for_value(prometheus_url: str, expression: str, expected: float, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = query(prometheus_url, expression)
        if value == expected:
            return
        time.sleep(1)
    raise AssertionError(f"{expression} = {value}, expected {expected}")


@pytest.fixture(scope="module")
def observed(serve_base_url, tiny_model_dir):
    """An app of its own (so its counts are exactly what these tests send): autoscaled
    (for Serve's autoscaling metrics), with a limit of 3 per minute per client."""
    args = AppArgs(
        models=[ModelArgs(name=MODEL, source=str(tiny_model_dir), num_cpus=0.1,
                          autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=2))],
        ingress=IngressArgs(num_cpus=0.1),
        rate_limits=RateLimitArgs(default=QuotaArgs(requests=["3/minute"]), trusted_proxies=["127.0.0.1/32"]),
    )
    url = deploy(serve_base_url, args, "observed")
    yield url
    serve.delete("observed")


@pytest.fixture(scope="module")
def traffic(observed):
    """Sends 6 requests from 6 clients and 4 from one more (3 pass, 1 is limited)."""
    responses = []
    for client in [f"192.0.2.{i}" for i in range(1, 7)] + ["192.0.2.99"] * 4:
        responses.append(
            httpx.post(
                f"{observed}/generate",
                # Longer than a prefix-cache block: every request after the first reuses it.
                json={"prompt": PROMPT, "max_new_tokens": 5, "temperature": 0},
                headers={"X-Forwarded-For": client, "X-Request-ID": f"observed-{len(responses)}"},
                timeout=60,
            )
        )
    assert [r.status_code for r in responses].count(429) == 1
    return responses


def test_prometheus_sees_exactly_what_was_sent(prometheus, traffic):
    completion_tokens = sum(r.json()["usage"]["completion_tokens"] for r in traffic if r.status_code == 200)
    prompt_tokens = sum(r.json()["usage"]["prompt_tokens"] for r in traffic if r.status_code == 200)
    wait_for_value(
        prometheus, 'sum(ray_serve_num_http_requests_total{application="observed",route="/observed/generate"})', 10
    )
    wait_for_value(prometheus, f'sum(ray_textgen_completion_tokens_total{{model="{MODEL}"}})', completion_tokens)
    wait_for_value(prometheus, f'sum(ray_textgen_prompt_tokens_total{{model="{MODEL}"}})', prompt_tokens)
    wait_for_value(prometheus, f'sum(ray_textgen_requests_total{{model="{MODEL}",status_code="200"}})', 9)
    wait_for_value(prometheus, f'sum(ray_textgen_requests_total{{model="{MODEL}",status_code="429"}})', 1)
    wait_for_value(prometheus, f'sum(ray_textgen_time_to_first_token_seconds_count{{model="{MODEL}"}})', 9)
    wait_for_value(prometheus, f'sum(ray_textgen_request_latency_seconds_count{{model="{MODEL}"}})', 10)
    wait_for_value(prometheus, f'sum(ray_textgen_prefix_cache_lookups_total{{model="{MODEL}"}})', 9)
    wait_for_value(prometheus, f'sum(ray_textgen_prefix_cache_queried_tokens_total{{model="{MODEL}"}})', prompt_tokens)
    # Whole 16-token blocks short of the last token; each replica's first request finds none.
    hit = query(prometheus, f'sum(ray_textgen_prefix_cache_hit_tokens_total{{model="{MODEL}"}})')
    per_request = (prompt_tokens // 9 - 1) // 16 * 16
    assert hit in {per_request * hits for hits in (7, 8)} and per_request > 0, (hit, per_request)
    # A gauge the idle scheduler keeps recording (Ray drops one not recorded for a while).
    deadline = time.monotonic() + 30
    while not (query(prometheus, f'sum(ray_textgen_prefix_cache_bytes{{model="{MODEL}"}})') or 0) > 0:
        assert time.monotonic() < deadline, "the prefix cache's bytes never reached Prometheus"
        time.sleep(1)
    assert query(prometheus, 'sum(ray_textgen_rate_limited_total{route="/generate"})') >= 1
    # Who holds the batch: each client (keys are off) is a tenant, labelled by address.
    repeated = sum(r.json()["usage"]["completion_tokens"] for r in traffic[6:] if r.status_code == 200)
    wait_for_value(prometheus, f'sum(ray_textgen_tenant_completion_tokens_total{{model="{MODEL}"}})', completion_tokens)
    wait_for_value(
        prometheus, f'sum(ray_textgen_tenant_completion_tokens_total{{model="{MODEL}",tenant="ip:192.0.2.99"}})',
        repeated,
    )
    # None would mean no series: the tenant's gauge is there, and it holds nothing now.
    wait_for_value(prometheus, f'sum(ray_textgen_tenant_sequences{{model="{MODEL}",tenant="ip:192.0.2.99"}})', 0)


def test_prometheus_sees_the_load_autoscaling_acts_on_and_its_decision(prometheus, traffic):
    # The traffic has ended: the replica holds nothing and owes nothing, and Serve's
    # autoscaler, at min_replicas, wants the one replica it runs. A series that is not
    # scraped reads None, not 0, so these also show that Prometheus has them.
    wait_for_value(prometheus, f'sum(ray_textgen_token_backlog{{model="{MODEL}"}})', 0)
    wait_for_value(prometheus, f'sum(ray_textgen_sequences{{model="{MODEL}",state="running"}})', 0)
    wait_for_value(prometheus, f'sum(ray_textgen_sequences{{model="{MODEL}",state="waiting"}})', 0)
    wait_for_value(prometheus, 'max(ray_serve_autoscaling_desired_replicas{application="observed"})', 1)


def exported_names(metrics_url: str) -> set[str]:
    text = httpx.get(metrics_url, timeout=10).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_panel_names_exported_metrics(cluster, prometheus, traffic):
    dashboard = json.loads((ROOT / "configs" / "grafana" / "ray-textgen.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(expressions) >= 10
    wanted = {name for expression in expressions for name in re.findall(r"\b(ray_[a-z0-9_]+)", expression)}
    deadline = time.monotonic() + 30
    while (missing := wanted - exported_names(cluster.metrics_url)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, f"dashboard names metrics the service does not export: {sorted(missing)}"
    for expression in expressions:  # and Prometheus accepts every expression
        filled = expression.replace("$__rate_interval", "1m")
        answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": filled}, timeout=10).json()
        assert answer["status"] == "success", (expression, answer)


def test_design_metrics_are_all_exported(cluster, traffic):
    design = {
        "ray_textgen_requests_total", "ray_textgen_rate_limited_total", "ray_textgen_prompt_tokens_total",
        "ray_textgen_completion_tokens_total", "ray_textgen_request_latency_seconds_bucket",
        "ray_textgen_time_to_first_token_seconds_bucket", "ray_textgen_queue_time_seconds_bucket",
        "ray_textgen_batch_size_bucket", "ray_textgen_model_load_seconds_bucket", "ray_textgen_sequences",
        "ray_textgen_token_backlog", "ray_textgen_prefix_cache_lookups_total",
        "ray_textgen_prefix_cache_queried_tokens_total", "ray_textgen_prefix_cache_hit_tokens_total",
        "ray_textgen_prefix_cache_bytes", "ray_textgen_tenant_completion_tokens_total",
        "ray_textgen_tenant_sequences",
    }
    deadline = time.monotonic() + 30
    while (missing := design - exported_names(cluster.metrics_url)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing


def test_a_request_id_is_followed_into_the_model_replica_log(cluster, traffic):
    request_id = traffic[0].headers["x-request-id"]
    assert request_id == "observed-0"
    logs = sorted((cluster.session_dir / "logs" / "serve").glob("replica_observed_*.log"))
    deadline = time.monotonic() + 10
    found = {}
    while time.monotonic() < deadline and len(found) < 2:
        for log in logs:
            for line in log.read_text(errors="replace").splitlines():
                if f"request_id={request_id} " in line:
                    found["ingress" if "Ingress" in log.name else "model"] = line
        time.sleep(0.5)
    assert "status=200" in found["ingress"]
    assert re.search(r"prompt_tokens=\d+ completion_tokens=5 queue_ms=[\d.]+ ttft_ms=[\d.]+", found["model"])
