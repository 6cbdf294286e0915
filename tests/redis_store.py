"""A real redis-server for the tests, and ingress-replica stand-ins that race on it."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time


def start_redis(port: int) -> subprocess.Popen:
    """A redis-server on 127.0.0.1:``port`` that keeps nothing on disk, once it accepts
    connections."""
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (Debian package redis-server; .ci/run installs it)"
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("redis-server did not start")


def admit_together(url: str, quota_tokens: str, tokens: int, concurrent: int, start, admitted) -> None:
    """One ingress replica (a process of its own): once every racer is at ``start`` (a
    barrier), ``concurrent`` admissions each reserving ``tokens`` against the token
    quota ``quota_tokens`` of one key; puts how many were admitted on ``admitted``."""
    from serve_app.rate_limit import Quota, RateLimiter, StorageBackend

    async def race() -> int:
        limiter = RateLimiter(StorageBackend(url), "moving-window", fail_open=False, timeout_s=10)
        assert await limiter.connect()
        quota = Quota(tokens=(quota_tokens,))
        start.wait()
        decisions = await asyncio.gather(*(limiter.admit("key:racer", quota, tokens) for _ in range(concurrent)))
        return sum(decision.allowed for decision in decisions)

    admitted.put(asyncio.run(race()))
