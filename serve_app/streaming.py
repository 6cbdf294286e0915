"""Calling a model and relaying its stream as server-sent events, for every API flavour.

The first item of a model stream is a `StreamStart`, sent only once the model accepted
the request; awaiting it before answering gives an invalid request a real status code
instead of a 200 stream. After that the status line is sent, so a failure (or the
deadline) is reported in-band as a last error event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.protocol import (
    AdapterLoadError, EngineExitedError, GenerationParams, GenerationResult, InvalidRequestError, SequenceDelta, StreamStart,
)
from serve_app.access import AccessControl, cancel_quietly
from serve_app.errors import ServiceError, adapter_failure, error_body
from serve_app.schemas import Usage, usage_of

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

# (delta, usage once the last sequence has ended, else None) -> events to send.
DeltaFormatter = Callable[[SequenceDelta, Usage | None], Iterable[dict]]
# usage -> events to send after the last delta, before [DONE].
EndFormatter = Callable[[Usage], Iterable[dict]]


# A model replica that died or cannot be reached: the request can be retried elsewhere.
# EngineExitedError: the replica was still there, its engine process not (it exits next).
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, EngineExitedError)


class _Calls(list):
    """Model calls started together, cancelled together."""

    def cancel(self) -> None:
        for call in self:
            cancel_quietly(call)


def _overloaded(handle: DeploymentHandle) -> ServiceError:
    return ServiceError(
        503, f"{handle.deployment_name} is at capacity; retry shortly", headers={"Retry-After": "1"}
    )


def _replica_failed() -> ServiceError:
    return ServiceError(
        503, "the model replica failed and a retry failed too; retry shortly", headers={"Retry-After": "2"}
    )


def _timed_out(request: Request) -> ServiceError:
    return ServiceError(
        504,
        f"no answer within {request.state.timeout_s:g} s; ask for fewer tokens or send a longer "
        "X-Request-Timeout",
    )


def start_clock(request: Request, timeout_s: float) -> None:
    """Starts the request's deadline (its whole life in the ingress counts)."""
    request.state.timeout_s = timeout_s
    request.state.deadline = asyncio.get_running_loop().time() + timeout_s


async def generate(
    request: Request,
    access: AccessControl,
    handle: DeploymentHandle,
    *params: GenerationParams,
) -> list[GenerationResult]:
    """Admits the request once (see `AccessControl.admit_around`), then generates every
    ``params`` (one per prompt) to the end; notes the total usage on the request and
    charges it to the client's token quota.

    Nothing reaches the client before the end, so a model replica that dies meanwhile
    costs one retry, not an error (see `_start`).

    Raises:
        ServiceError: 503 (model queue full, replica failed twice), 504 (deadline).
    """
    request.state.tokens_needed = sum(one.worst_case_tokens() for one in params)
    params = tuple(for_tenant(request, one) for one in params)
    try:
        _, results = await _start(
            request, access, handle,
            lambda: _Calls(handle.generate.remote(one) for one in params),
            lambda calls: asyncio.gather(*calls),
        )
        for result in results:
            if isinstance(result, InvalidRequestError):  # the model's refusal, as a value
                raise result
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError) or (isinstance(exc, ServiceError) and exc.status_code == 504):
            # The client left, or the deadline passed, while the model generated: it
            # stopped, but its count never reached us. The reservation (the most it
            # could have generated) is kept rather than given back, so that leaving
            # early never makes a request free.
            access.settle_tokens(request, request.state.tokens_needed)
        raise
    request.state.usage = usage_of(
        sum(result.prompt_tokens for result in results), sum(result.completion_tokens for result in results),
        sum(result.cached_tokens for result in results),
    )
    access.settle_tokens(request, request.state.usage.total_tokens)
    return results


async def ask(request: Request, access: AccessControl, handle: DeploymentHandle, start_call: Callable[[], Any]) -> Any:
    """A model call with one answer that generates nothing (tokenizing): admitted,
    timed and retried as a generation, counted against request limits, never token
    quotas. Returns its answer.

    Raises:
        InvalidRequestError: the model refused it.
        ServiceError: 503 or 504, as for `generate`.
    """
    request.state.tokens_needed = None
    _, answer = await _start(request, access, handle, start_call, lambda call: call)
    if isinstance(answer, InvalidRequestError):
        raise answer
    return answer


async def open_stream(
    request: Request, access: AccessControl, handle: DeploymentHandle, params: GenerationParams
) -> tuple[Any, StreamStart]:
    """Admits the request and opens its model stream; returns it with its StreamStart.
    Until that first item nothing was sent, so a failed replica costs one retry.

    Raises:
        InvalidRequestError: the model rejected the request (before any byte was sent).
        ServiceError: 503 or 504, as for `generate`.
    """
    request.state.tokens_needed = params.worst_case_tokens()
    params = for_tenant(request, params)
    stream, start = await _start(
        request, access, handle,
        lambda: handle.options(stream=True).generate_stream.remote(params),
        lambda stream: stream.__anext__(),
    )
    if isinstance(start, InvalidRequestError):  # the model's refusal: its only item
        cancel_quietly(stream)
        raise start
    return stream, start


async def _start(
    request: Request,
    access: AccessControl,
    handle: DeploymentHandle,
    start_call: Callable[[], Any],
    first_answer: Callable[[Any], Awaitable[T]],
) -> tuple[Any, T]:
    """Admits the request, starts the model call and awaits its first answer, all
    before the request's deadline; returns the call and that answer. Nothing has
    reached the client yet, so a replica that died is worth one retry elsewhere.
    Past the deadline, or on any failure, the call is cancelled (the replica drops it
    from its batch at the next step)."""
    call = None
    try:
        async with asyncio.timeout_at(request.state.deadline):
            call = await access.admit_around(request, start_call)
            try:
                return call, await first_answer(call)
            except REPLICA_FAILURES:
                cancel_quietly(call)
                logger.warning("request_id=%s model replica failed; retrying once", request.state.request_id)
                call = start_call()
                return call, await first_answer(call)
    except BaseException as exc:
        if call is not None:
            cancel_quietly(call)
        if isinstance(exc, TimeoutError):
            raise _timed_out(request) from None
        if isinstance(exc, BackPressureError):
            raise _overloaded(handle) from None
        if isinstance(exc, REPLICA_FAILURES):
            raise _replica_failed() from None
        raise


def for_tenant(request: Request, params: GenerationParams) -> GenerationParams:
    """``params`` for the request's client, the tenant whose share of the batch it
    takes (its identity: an API key's name or its address; never the key)."""
    client = request.state.client
    return dataclasses.replace(params, tenant=client.identity, tenant_weight=client.quota.weight)


def sse(payload: object) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def event_stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def relay(
    request: Request,
    access: AccessControl,
    stream,
    start: StreamStart,
    num_sequences: int,
    on_delta: DeltaFormatter,
    on_end: EndFormatter,
    openai: bool,
    first_events: Iterable[dict] = (),
) -> AsyncIterator[str]:
    """The SSE body of a model stream, ending with ``data: [DONE]``.

    If the client goes away, the model stream is cancelled, so the model replica stops
    generating for it; the tokens generated until then are charged to the client.
    """
    completion_tokens = [0] * num_sequences
    cached_tokens = 0
    unfinished = num_sequences
    try:
        for event in first_events:
            yield sse(event)
        async with asyncio.timeout_at(request.state.deadline):
            async for deltas in stream:
                for delta in deltas:
                    completion_tokens[delta.index] = delta.completion_tokens
                    cached_tokens += delta.cached_tokens
                    unfinished -= delta.finish_reason is not None
                    usage = usage_of(start.prompt_tokens, sum(completion_tokens), cached_tokens) if unfinished == 0 else None
                    for event in on_delta(delta, usage):
                        yield sse(event)
        for event in on_end(usage_of(start.prompt_tokens, sum(completion_tokens), cached_tokens)):
            yield sse(event)
    except TimeoutError:
        message = f"no answer within {request.state.timeout_s:g} s; the generation was stopped"
        yield sse(error_body(504, message, openai=openai))
    except AdapterLoadError as exc:
        yield sse(error_body(500, adapter_failure(exc), "model", openai=openai))
    except REPLICA_FAILURES:  # past the first event nothing can be sent again elsewhere
        logger.warning("request_id=%s model replica failed mid-stream", request.state.request_id)
        yield sse(error_body(503, "the model replica failed during the generation; retry", openai=openai))
    except Exception:  # noqa: BLE001 - the status line is sent; report in-band
        request_id = request.state.request_id
        logger.exception("request_id=%s stream failed", request_id)
        yield sse(error_body(500, f"generation failed; quote request id {request_id}", openai=openai))
    finally:
        cancel_quietly(stream)  # nothing left to stop after a normal end; stops the model if the client left
        request.state.usage = usage_of(start.prompt_tokens, sum(completion_tokens), cached_tokens)
        access.settle_tokens(request, request.state.usage.total_tokens)
    yield "data: [DONE]\n\n"
