"""Bounds on what one request may cost, checked before any route runs: concurrent
requests per ingress replica (503), body size (413), JSON bodies only (415), and the
request's deadline (X-Request-Timeout, up to a ceiling)."""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import ServiceError, error_response, route_path, speaks_openai
from serve_app.request_context import PROBE_PATHS

TIMEOUT_HEADER = "X-Request-Timeout"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})



def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives ``body`` once, then whatever comes next (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def request_deadline_s(headers: Headers, default_s: float, ceiling_s: float) -> float:
    """The request's time budget: its X-Request-Timeout (seconds), else the default.

    Raises:
        ServiceError: 422 when the header is not a number in (0, ceiling].
    """
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default_s
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= ceiling_s:
        raise ServiceError(
            422, f"{TIMEOUT_HEADER} must be a number of seconds in (0, {ceiling_s:g}]", param=TIMEOUT_HEADER
        )
    return value


class RequestGuardMiddleware:
    """Pure ASGI. Sheds load past ``max_concurrent`` requests in this replica with a
    fast 503 (rather than letting a queue grow without bound), and refuses bodies that
    are too large or not JSON before anything reads them."""

    def __init__(self, app: ASGIApp, max_concurrent: int, max_body_bytes: int, body_read_timeout_s: float) -> None:
        self.app = app
        self.max_concurrent = max_concurrent
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        openai = speaks_openai(scope)
        refusal = self._refusal(scope)
        if refusal is not None:
            status, message, headers = refusal
            await error_response(status, message, headers=headers, openai=openai)(scope, receive, send)
            return
        counted = route_path(scope) not in PROBE_PATHS  # probes must answer however loaded the replica is
        if counted:
            self.in_flight += 1  # from the first byte: a body that trickles in holds a slot too
        try:
            if scope.get("method") in _BODY_METHODS:
                # Read the body here, up to the limit, so that a body sent without a
                # Content-Length (chunked) is refused the same way; the route then reads
                # it from memory. Bodies are small (1 MiB by default).
                try:
                    async with asyncio.timeout(self.body_read_timeout_s):
                        body = await self._read_body(receive)
                except TimeoutError:
                    message = f"the request body did not arrive within {self.body_read_timeout_s:g} s"
                    await error_response(408, message, openai=openai)(scope, receive, send)
                    return
                if body is None:
                    await error_response(413, self._too_large_message(), openai=openai)(scope, receive, send)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            if counted:
                self.in_flight -= 1

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it exceeds the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the route will see an empty body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large_message(self) -> str:
        return f"request body exceeds {self.max_body_bytes} bytes"

    def _refusal(self, scope: Scope) -> tuple[int, str, dict] | None:
        if self.in_flight >= self.max_concurrent and route_path(scope) not in PROBE_PATHS:
            return 503, "the service is at capacity; retry shortly", {"Retry-After": "1"}
        if scope.get("method") not in _BODY_METHODS:
            return None
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, self._too_large_message(), {}
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if not content_type:
            # FastAPI would not read such a body as JSON, and its complaint names no
            # field; an empty body goes on to the "no body" 422, which names one.
            if (length is not None and length != "0") or "transfer-encoding" in headers:
                return 415, "send JSON (Content-Type: application/json); the request has no Content-Type", {}
        elif content_type != "application/json" and not content_type.endswith("+json"):
            return 415, f"send JSON (Content-Type: application/json), not {content_type}", {}
        return None
