"""Per-request context: the request id, the access log line, and the last-resort 500."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import metrics
from serve_app.errors import error_response, route_path, speaks_openai

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


# FastAPI's schema pages: served by plain Starlette routes, which leave no `route` in
# the scope.
SCHEMA_PATHS = frozenset({"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})
# Liveness and readiness probes: never counted, limited or shed (vLLM's /health and
# /ping beside our own).
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/health", "/ping"})


def route_label(scope: Scope) -> str:
    """The matched route's template (bounded label values for metrics), or `unmatched`."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return template
    path = route_path(scope)
    return path if path in SCHEMA_PATHS else "unmatched"


_LOGGED_ERROR_CHARS = 300


def _error_message(body: bytes) -> str:
    """The message of an error body (every error response has one: errors.error_body),
    cut to one short line; empty for a body of another kind."""
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""
    return message if len(message) <= _LOGGED_ERROR_CHARS else message[:_LOGGED_ERROR_CHARS] + "..."


class RequestContextMiddleware:
    """Pure ASGI middleware (it does not buffer streaming responses).

    Behind Serve's proxy every request arrives with an ``x-request-id`` (the client's,
    or one the proxy made) and the proxy puts it on the response; this middleware uses
    that same id, so our log lines, Serve's and the client agree. It sets the response
    header itself only when no proxy did (the app served bare, as in unit tests).

    It logs one line per request (id, method, path, status, tokens, latency; never the
    prompt; for an error, the message its body gave the client) and turns an exception
    that escaped every handler into a masked JSON 500. A client's error is that INFO line
    and nothing more: tracebacks are for server faults.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming_id = self._incoming_request_id(scope)
        sane = incoming_id is None or _REQUEST_ID.fullmatch(incoming_id) is not None
        # An id that is not sane never reaches a log line: the request is refused
        # under an id of our own (Serve's proxy still echoes the client's).
        request_id = incoming_id if incoming_id is not None and sane else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        response_status: list[int] = []
        error_messages: list[str] = []
        app = self.app if sane else self._refuse_request_id

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                if incoming_id is None:
                    MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
                response_status.append(message["status"])
            elif message["type"] == "http.response.body" and response_status[0] >= 400 and not error_messages:
                error_messages.append(_error_message(message.get("body", b"")))
            await send(message)

        try:
            await app(scope, receive, send_with_request_id)
        except Exception:
            logger.exception("request_id=%s unhandled error", request_id)
            if not response_status:
                await self._send_internal_error(scope, receive, send_with_request_id, request_id)
        finally:
            usage = state.get("usage")
            status = response_status[0] if response_status else 500
            latency_s = time.perf_counter() - started
            metrics.record_request(route_label(scope), status, state.get("model", ""), latency_s)
            logger.info(
                "request_id=%s method=%s path=%s status=%s prompt_tokens=%s "
                "completion_tokens=%s latency_ms=%.1f%s",
                request_id,
                scope.get("method"),
                _loggable_path(scope.get("path", "")),
                status,
                usage.prompt_tokens if usage else "-",
                usage.completion_tokens if usage else "-",
                latency_s * 1000,
                f" error={json.dumps(error_messages[0])}" if error_messages and error_messages[0] else "",
            )

    @staticmethod
    def _incoming_request_id(scope: Scope) -> str | None:
        """The id the client (or Serve's proxy, which makes one when the client sent
        none) put in X-Request-ID."""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                return value.decode("latin-1")
        return None

    @staticmethod
    async def _refuse_request_id(scope: Scope, receive: Receive, send: Send) -> None:
        message = f"{REQUEST_ID_HEADER} must be 1 to 128 letters, digits, `.`, `_`, `:` or `-`"
        await error_response(422, message, REQUEST_ID_HEADER, openai=speaks_openai(scope))(scope, receive, send)

    @staticmethod
    async def _send_internal_error(scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        response = error_response(
            500, f"internal error; quote request id {request_id}", openai=speaks_openai(scope)
        )
        await response(scope, receive, send)


def _loggable_path(path: str) -> str:
    """The path percent-encoded again: decoded, ``/x%0Arequest_id=...`` would write a
    second, forged line into the log (and any control or non-ASCII character is
    shown as what the client sent)."""
    return urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~")
