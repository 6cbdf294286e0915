"""A GPU cluster simulated on one machine: the node types of cluster.yaml, with GPU nodes
launched and terminated by Ray's own fake multi-node autoscaler (the provider Ray tests
its autoscaler with), so Serve's autoscaling and Ray's node autoscaling are seen end to
end without a cloud or a GPU.

Every node is a set of Ray processes on this machine; a "GPU" node advertises a logical
GPU. Model replicas reserve one GPU each (accelerator: gpu), so each lands on its own GPU
node, and compute on the CPU (device: cpu).

    make simulate          # = python -m bench.simulated_cluster: start, deploy
                           #   configs/serve.simulated.yaml, drive a burst, print what scales

Local use only: Ray's token auth is off (RAY_AUTH_MODE=disabled, as for `make serve`) and
every port listens on 127.0.0.1. `SimulatedCluster.stop` stops exactly the processes it
started (they share one session id), never another Ray cluster on the machine; Ray's own
`AutoscalingCluster` runs `ray stop --force`, which ends every Ray cluster there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.common import free_port, machine, percentile

ROOT = Path(__file__).parents[1]
RAY = Path(sys.executable).parent / "ray"
SIMULATED_CONFIG = ROOT / "configs" / "serve.simulated.yaml"
GPU_WORKER = "gpu_worker"
# The environment of every process of the cluster: Ray's fake provider, a 1 s autoscaler
# loop (5 s by default), and the Ray settings of the Makefile (README, "The Ray environment").
RAY_ENVIRONMENT = {
    "RAY_FAKE_CLUSTER": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def cluster_node_types(max_gpu_workers: int | None = None) -> tuple[dict, dict]:
    """The head's resources and the GPU worker type of cluster.yaml, with no GPU worker
    at start (the simulation shows the first one being added)."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = dict(types[config["head_node_type"]]["resources"])
    worker = copy.deepcopy(types[GPU_WORKER])
    worker["node_config"] = {}  # the cloud's instance type means nothing here
    worker["min_workers"] = 0
    if max_gpu_workers is not None:
        worker["max_workers"] = max_gpu_workers
    return head, worker


class SimulatedCluster:
    """A Ray head with the fake multi-node autoscaler, on 127.0.0.1.

    Args:
        dashboard_port: the dashboard (Serve REST API, state API) port.
        max_gpu_workers: most GPU nodes at once (cluster.yaml's max_workers if None).
        idle_timeout_minutes: how long a GPU node may sit idle before it is terminated.
        temp_dir: Ray's temp dir; a private one keeps the session apart from other
            clusters on the machine (None: a new one under /tmp).
    """

    def __init__(
        self,
        dashboard_port: int | None = None,
        max_gpu_workers: int | None = None,
        idle_timeout_minutes: float = 0.1,
        temp_dir: str | None = None,
    ) -> None:
        self.head_resources, self.gpu_worker = cluster_node_types(max_gpu_workers)
        self.gcs_port = free_port()
        self.dashboard_port = dashboard_port or free_port()
        self.metrics_port = free_port()
        self.idle_timeout_minutes = idle_timeout_minutes
        # Short: Ray's socket paths under it must stay within 107 characters.
        self._own_temp_dir = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="textgen-sim-", dir="/tmp")
        self._session_id: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def logs_dir(self) -> Path:
        return Path(self.temp_dir) / "session_latest" / "logs"

    def autoscaler_config(self) -> dict:
        """The config the fake provider reads: cluster.yaml's node types, on this machine."""
        return {
            "cluster_name": "textgen-simulated",
            "max_workers": self.gpu_worker["max_workers"],
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": self.address,
            },
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": {
                "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
                GPU_WORKER: self.gpu_worker,
            },
            "head_node_type": "ray.head.default",
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self) -> None:
        """Starts the head (a few seconds); GPU nodes follow demand."""
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)
        config_path = Path(self.temp_dir) / "autoscaler.json"
        config_path.write_text(json.dumps(self.autoscaler_config()))
        head = {name: value for name, value in self.head_resources.items() if name not in ("CPU", "GPU")}
        command = [
            str(RAY), "start", "--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
            f"--autoscaling-config={config_path}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.head_resources.get('CPU', 1)}", f"--num-gpus={self.head_resources.get('GPU', 0)}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
            f"--metrics-export-port={self.metrics_port}", "--disable-usage-stats",
        ]
        if head:
            command.append(f"--resources={json.dumps(head)}")
        # Every worker imports from the project's root: an engine class may live in
        # tests/ or bench/ (the fake engine), which the project's install leaves out.
        python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        environment = {**os.environ, **RAY_ENVIRONMENT, "PYTHONPATH": python_path}
        # A session of its own: every process of the cluster, GPU nodes included (the
        # autoscaler starts them), inherits its id, which is how `stop` finds them all.
        starter = subprocess.Popen(
            command, env=environment, start_new_session=True, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._session_id = starter.pid
        _, errors = starter.communicate(timeout=120)
        if starter.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({starter.returncode}): {errors[-2000:]}")
        self.wait_for(lambda: self._get("/api/serve/applications/") is not None, 60, "the dashboard")

    def stop(self) -> None:
        """Stops every process of the cluster (SIGTERM, then SIGKILL after 5 s)."""
        if self._session_id is None:
            return
        members = self._members()
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (members := self._members()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._session_id = None
        if self._own_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _members(self) -> list[int]:
        """The cluster's live processes (zombies have exited already)."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                if os.getsid(process.pid) == self._session_id and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process.pid)
        return found

    def __enter__(self) -> SimulatedCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # What the dashboard says (HTTP only: no Ray client in this process, so it can run
    # beside a test session already connected to another cluster).

    def _get(self, path: str) -> dict | None:
        try:
            response = httpx.get(f"{self.dashboard_url}{path}", timeout=10)
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None

    def deploy(self, serve_config: dict) -> None:
        """What `serve deploy` does: PUT the config to the dashboard's Serve API."""
        response = httpx.put(f"{self.dashboard_url}/api/serve/applications/", json=serve_config, timeout=60)
        response.raise_for_status()

    def metrics(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every node's current samples of the Prometheus metric ``name`` (labels, value),
        read from the metrics agents the head lists for Prometheus."""
        discovery = Path(self.temp_dir) / "prom_metrics_service_discovery.json"
        targets = [t for group in json.loads(discovery.read_text()) for t in group["targets"]]
        samples = []
        for target in targets:
            with contextlib.suppress(httpx.HTTPError):
                for family in text_string_to_metric_families(httpx.get(f"http://{target}/metrics", timeout=5).text):
                    samples += [(s.labels, s.value) for s in family.samples if s.name == name]
        return samples

    def gpu_nodes(self) -> list[dict]:
        """Alive nodes with a GPU."""
        answer = self._get("/api/v0/nodes?limit=100&detail=true") or {}
        nodes = answer.get("data", {}).get("result", {}).get("result", [])
        return [n for n in nodes if n["state"] == "ALIVE" and n.get("resources_total", {}).get("GPU", 0) >= 1]

    def replicas(self, app: str, deployment: str) -> list[dict]:
        """The deployment's replicas (replica_id, state, node_id, ...), [] before deploy."""
        applications = (self._get("/api/serve/applications/") or {}).get("applications", {})
        deployments = applications.get(app, {}).get("deployments", {})
        return deployments.get(deployment, {}).get("replicas", [])

    def app_status(self, app: str) -> str | None:
        applications = (self._get("/api/serve/applications/") or {}).get("applications", {})
        return applications.get(app, {}).get("status")

    def _request_lines(self, app: str, deployment: str) -> dict[str, list[re.Match]]:
        """Each replica's request log lines (ModelServer._log_request), by replica id."""
        lines = {}
        for log in (self.logs_dir / "serve").glob(f"replica_{app}_{deployment}_*.log"):
            text = log.read_text(errors="replace").splitlines()
            lines[log.stem.removeprefix(f"replica_{app}_{deployment}_")] = [
                match for line in text if (match := _REQUEST_LOG_LINE.match(line))
            ]
        return lines

    def requests_per_replica(self, app: str, deployment: str) -> dict[str, int]:
        """Requests each replica of the deployment has logged."""
        return {replica: len(lines) for replica, lines in self._request_lines(app, deployment).items()}

    def first_tokens(self, app: str, deployment: str) -> dict[str, float]:
        """Each replica's first token (wall-clock seconds): a request's line is written
        as it ends, with its ttft and total milliseconds."""
        firsts = {}
        for replica, lines in self._request_lines(app, deployment).items():
            for match in lines:
                if match[2] == "-":
                    continue
                ended = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                first = ended - float(match[3]) / 1000 + float(match[2]) / 1000
                firsts[replica] = min(firsts.get(replica, first), first)
        return firsts

    @staticmethod
    def wait_for(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5):
        """Polls ``condition`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(interval_s)
        raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


# A model replica's line per request (ModelServer._log_request), in Ray's log format;
# ttft_ms is "-" for a request that ended before its first token.
_REQUEST_LOG_LINE = re.compile(
    r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*request_id=\S+ .*ttft_ms=([\d.]+|-) total_ms=([\d.]+)"
)


class Timeline:
    """Watches GPU nodes and running replicas of one deployment every ``interval_s`` on a
    thread, and keeps the moments they changed (seconds since ``started``)."""

    def __init__(self, cluster: SimulatedCluster, app: str, deployment: str, interval_s: float = 0.5) -> None:
        self.cluster, self.app, self.deployment, self.interval_s = cluster, app, deployment, interval_s
        self.started, self._started_wall = time.monotonic(), time.time()
        self.events: list[tuple[float, str, int]] = []  # (seconds, "gpu_nodes" | "running_replicas", count)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="timeline", daemon=True)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> float:
        return time.monotonic() - self.started

    def at(self, wall_clock: float) -> float:
        """A wall-clock moment in seconds since ``started``."""
        return wall_clock - self._started_wall

    def latest(self, kind: str) -> int:
        return next((count for _, k, count in reversed(self.events) if k == kind), 0)

    def first_time(self, kind: str, count: int, after: float = 0.0) -> float | None:
        """When ``kind`` first reached ``count`` at or after ``after``."""
        return next((t for t, k, c in self.events if k == kind and c == count and t >= after), None)

    def _watch(self) -> None:
        while not self._stop.is_set():
            nodes = len(self.cluster.gpu_nodes())
            running = sum(r["state"] == "RUNNING" for r in self.cluster.replicas(self.app, self.deployment))
            for kind, count in (("gpu_nodes", nodes), ("running_replicas", running)):
                if count != self.latest(kind) or not any(k == kind for _, k, _ in self.events):
                    self.events.append((round(self.now(), 1), kind, count))
            self._stop.wait(self.interval_s)


@dataclasses.dataclass
class Outcome:
    """One request of a load: when it was sent (seconds since the load began), how long
    it took, and how it ended."""

    sent_at: float
    latency_s: float
    status: int | None  # None: no HTTP answer (connection error, client timeout)
    retry_after: str | None = None
    error: str | None = None


async def send(client: httpx.AsyncClient, url: str, body: dict, began: float) -> Outcome:
    sent_at = time.monotonic()
    try:
        response = await client.post(f"{url}/generate", json=body)
    except httpx.HTTPError as exc:
        return Outcome(sent_at - began, time.monotonic() - sent_at, None, error=f"{type(exc).__name__}: {exc}")
    return Outcome(sent_at - began, time.monotonic() - sent_at, response.status_code, response.headers.get("Retry-After"))


async def closed_loop(url: str, bodies: list[dict], stop: threading.Event, timeout_s: float = 300) -> list[Outcome]:
    """One client per body, each sending its body again as soon as it has an answer
    (after Retry-After on a 503, as a well-behaved client does), until ``stop``."""
    began = time.monotonic()
    outcomes: list[Outcome] = []

    async def client_loop(client: httpx.AsyncClient, body: dict) -> None:
        while not stop.is_set():
            outcome = await send(client, url, body, began)
            outcomes.append(outcome)
            if outcome.status == 503:
                await asyncio.sleep(float(outcome.retry_after or 1))

    limits = httpx.Limits(max_connections=len(bodies) + 1)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, body) for body in bodies))
    return outcomes


async def open_loop(url: str, schedule: list[tuple[float, dict]], timeout_s: float = 300) -> list[Outcome]:
    """Sends each body at its offset (seconds from now), whatever is still in flight."""
    began = time.monotonic()

    async def at(offset: float, client: httpx.AsyncClient, body: dict) -> Outcome:
        await asyncio.sleep(max(0.0, began + offset - time.monotonic()))
        return await send(client, url, body, began)

    limits = httpx.Limits(max_connections=len(schedule) + 1)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        return list(await asyncio.gather(*(at(offset, client, body) for offset, body in schedule)))


def to_json(result: dict) -> str:
    """Indented JSON, with lists of plain values (a request's record, a timeline event)
    on one line each."""
    text = json.dumps(result, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda match: "[" + " ".join(match[1].split()) + "]", text)


def load_serve_config(**overrides) -> dict:
    """configs/serve.simulated.yaml, with ``port`` and model fields overridden."""
    config = yaml.safe_load(SIMULATED_CONFIG.read_text())
    if "port" in overrides:
        config["http_options"]["port"] = overrides.pop("port")
    model = config["applications"][0]["args"]["models"][0]
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(model.get(key), dict):
            model[key] = {**model[key], **value}
        else:
            model[key] = value
    return config


def summarize(outcomes: list[Outcome]) -> dict:
    answered = [o for o in outcomes if o.status == 200]
    latencies = [o.latency_s for o in answered]
    return {
        "requests": len(outcomes),
        "status_200": len(answered),
        "status_503": sum(o.status == 503 for o in outcomes),
        "status_503_without_retry_after": sum(o.status == 503 and not o.retry_after for o in outcomes),
        "other": sum(o.status not in (200, 503) for o in outcomes),
        "p50_s": round(percentile(latencies, 0.5), 2) if latencies else None,
        "p99_s": round(percentile(latencies, 0.99), 2) if latencies else None,
    }


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the cluster's `with` block stops its processes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def demo(args: argparse.Namespace) -> None:
    """Starts the cluster, deploys the simulated config, drives a burst of clients and
    prints every change of GPU nodes and running replicas, then how long each replica
    took from its GPU node coming up to its first token; runs until Ctrl-C (or, with
    --until-idle, until no GPU node is left)."""
    config = load_serve_config(port=args.port)
    app = config["applications"][0]["name"]
    deployment = "Model-" + config["applications"][0]["args"]["models"][0]["name"]
    url = f"http://127.0.0.1:{args.port}"
    load, cold_starts = {}, []
    with SimulatedCluster(dashboard_port=args.dashboard_port, temp_dir=args.temp_dir) as cluster:
        print(f"cluster up: the dashboard on {cluster.dashboard_url}; watch it with")
        print(f"  RAY_AUTH_MODE=disabled .venv/bin/serve status -a {cluster.dashboard_url}")
        print(f"  Prometheus: configs/prometheus.yml reads {cluster.temp_dir}/prom_metrics_service_discovery.json")
        with Timeline(cluster, app, deployment) as timeline:
            printed = 0

            def report() -> bool:
                nonlocal printed
                for t, kind, count in timeline.events[printed:]:
                    print(f"  {t:6.1f} s  {kind} = {count}", flush=True)
                printed = len(timeline.events)
                return True

            cluster.deploy(config)
            print(f"deployed {SIMULATED_CONFIG.relative_to(ROOT)}: a GPU node starts for its first replica")
            cluster.wait_for(lambda: report() and cluster.app_status(app) == "RUNNING", 900, "the application")
            print(f"serving on {url}; now {args.clients} clients for {args.load_s:.0f} s")
            stop, results = threading.Event(), []
            bodies = [{"prompt": "Tell me a long story about a lighthouse keeper.", "max_new_tokens": 128}] * args.clients
            loader = threading.Thread(target=lambda: results.extend(asyncio.run(closed_loop(url, bodies, stop))))
            loader.start()
            try:
                deadline = time.monotonic() + args.load_s
                while time.monotonic() < deadline:
                    report()
                    time.sleep(1)
            finally:
                stop.set()
                loader.join()
            report()
            load = {**summarize(results), "per_replica": cluster.requests_per_replica(app, deployment)}
            print(f"load over: {load}")
            cold_starts = []
            for number, first_token in enumerate(sorted(cluster.first_tokens(app, deployment).values()), 1):
                node_up = timeline.first_time("gpu_nodes", number)
                running = timeline.first_time("running_replicas", number)
                token = round(timeline.at(first_token), 1)
                cold_starts.append({"replica": number, "gpu_node_up_s": node_up, "running_s": running,
                                    "first_token_s": token, "node_up_to_first_token_s": round(token - node_up, 1)})
                print(f"replica {number}: GPU node up at {node_up} s, replica running at {running} s, first token "
                      f"at {token} s: node up to first token {token - node_up:.1f} s")
            print("idle now: replicas go after downscale_delay_s (then to zero after downscale_to_zero_delay_s), "
                  "idle GPU nodes after idle_timeout_minutes. Ctrl-C stops the cluster.")
            try:
                while not (args.until_idle and timeline.latest("gpu_nodes") == 0):
                    report()
                    time.sleep(1)
                report()
            except KeyboardInterrupt:
                pass
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(to_json({
                "command": " ".join(["python -m bench.simulated_cluster", *sys.argv[1:]]),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": machine(), "config": str(SIMULATED_CONFIG.relative_to(ROOT)),
                "clients": args.clients, "load_s": args.load_s, "load": load, "cold_starts": cold_starts,
                "timeline": timeline.events,
            }))
            print(f"wrote {args.output}")
        print("stopping the cluster")


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the service")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--clients", type=int, default=24, help="closed-loop clients of the burst")
    parser.add_argument("--load-s", type=float, default=60, help="how long the burst lasts")
    parser.add_argument("--temp-dir", default="/tmp/ray", help="Ray's temp dir (its default, for configs/prometheus.yml)")
    parser.add_argument("--until-idle", action="store_true", help="stop once no GPU node is left, not at Ctrl-C")
    parser.add_argument("--output", type=Path, help="write the timeline and cold starts as JSON here")
    demo(parser.parse_args())


if __name__ == "__main__":
    main()
