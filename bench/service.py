"""`serve run` of this service's config for a benchmark: on a free port, in a Ray of its
own (a temporary folder), stopped with everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
import yaml

from bench.common import free_port


class Service:
    """`serve run configs/serve.yaml` from ``source`` (a checkout), rate limits lifted,
    on a free port; ``configure`` edits the config first, ``env`` adds to the
    environment of `serve run`. A context manager: ready on entry, shut down on exit."""

    def __init__(
        self, source: Path, log: Path, configure: Callable[[dict], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.source, self.log = source, log
        self.url = ""
        self._configure, self._env = configure, dict(env or {})
        self._process: subprocess.Popen | None = None
        self._ray_temp = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))

    def __enter__(self) -> Service:
        config = yaml.safe_load((self.source / "configs" / "serve.yaml").read_text())
        port = free_port()
        config["http_options"]["port"] = port
        if self._configure is not None:
            self._configure(config)
        config_path = self._ray_temp / "serve.yaml"
        config_path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": str(self._ray_temp),
               "TEXTGEN_RATE_LIMIT": "1000000/minute", "PYTHONPATH": str(self.source),
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **self._env}
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [str(Path(sys.executable).parent / "serve"), "run", str(config_path)],
                cwd=self.source, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self._process.poll() is not None:
                raise SystemExit(f"serve run from {self.source} exited; see {self.log}")
            time.sleep(1)
        self.__exit__()
        raise SystemExit(f"{self.url} never became ready; see {self.log}")

    def __exit__(self, *exc) -> None:
        self._process.send_signal(signal.SIGTERM)  # serve run shuts Serve and its Ray down
        try:
            self._process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        subprocess.run(["rm", "-rf", str(self._ray_temp)], check=False)
