"""Calling a model and relaying its stream as server-sent events, for every API flavour.

The first item of a model stream is a `StreamStart`, sent only once the model accepted
the request; awaiting it before answering gives an invalid request a real status code
instead of a 200 stream. After that the status line is sent, so a failure is reported
in-band as a last error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from deployments.protocol import GenerationParams, GenerationResult, SequenceDelta, StreamStart
from serve_app.access import AccessControl
from serve_app.schemas import Usage, usage_of

logger = logging.getLogger("ray.serve")

# (delta, usage once the last sequence has ended, else None) -> events to send.
DeltaFormatter = Callable[[SequenceDelta, Usage | None], Iterable[dict]]
# usage -> events to send after the last delta, before [DONE].
EndFormatter = Callable[[Usage], Iterable[dict]]
# message -> the error event of this API flavour.
ErrorFormatter = Callable[[str], dict]


class _Calls(list):
    """Model calls started together, cancelled together."""

    def cancel(self) -> None:
        for call in self:
            call.cancel()


async def generate(
    request: Request,
    access: AccessControl,
    route: str,
    handle: DeploymentHandle,
    *params: GenerationParams,
) -> list[GenerationResult]:
    """Admits the request once (see `AccessControl.admit_around`), then generates every
    ``params`` (one per prompt) to the end; notes the total usage on the request."""
    calls = await access.admit_around(
        request, route, lambda: _Calls(handle.generate.remote(one) for one in params)
    )
    try:
        results: list[GenerationResult] = await asyncio.gather(*calls)
    except BaseException:
        calls.cancel()
        raise
    request.state.usage = usage_of(
        sum(result.prompt_tokens for result in results), sum(result.completion_tokens for result in results)
    )
    return results


async def open_stream(
    request: Request, access: AccessControl, route: str, handle: DeploymentHandle, params: GenerationParams
) -> tuple[Any, StreamStart]:
    """Admits the request and opens its model stream; returns it with its StreamStart.

    Raises:
        InvalidRequestError: the model rejected the request (before any byte was sent).
    """
    stream = await access.admit_around(
        request, route, lambda: handle.options(stream=True).generate_stream.remote(params)
    )
    try:
        start = await stream.__anext__()
    except BaseException:
        stream.cancel()
        raise
    return stream, start


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
    on_error: ErrorFormatter,
    first_events: Iterable[dict] = (),
) -> AsyncIterator[str]:
    """The SSE body of a model stream, ending with ``data: [DONE]``.

    If the client goes away, the model stream is cancelled, so the model replica stops
    generating for it; the tokens generated until then are charged to the client.
    """
    completion_tokens = [0] * num_sequences
    unfinished = num_sequences
    try:
        for event in first_events:
            yield sse(event)
        async for deltas in stream:
            for delta in deltas:
                completion_tokens[delta.index] = delta.completion_tokens
                unfinished -= delta.finish_reason is not None
                usage = usage_of(start.prompt_tokens, sum(completion_tokens)) if unfinished == 0 else None
                for event in on_delta(delta, usage):
                    yield sse(event)
        for event in on_end(usage_of(start.prompt_tokens, sum(completion_tokens))):
            yield sse(event)
    except Exception:  # noqa: BLE001 - the status line is sent; report in-band
        request_id = request.state.request_id
        logger.exception("request_id=%s stream failed", request_id)
        yield sse(on_error(f"generation failed; quote request id {request_id}"))
    finally:
        stream.cancel()  # nothing left to stop after a normal end; stops the model if the client left
        request.state.usage = usage_of(start.prompt_tokens, sum(completion_tokens))
        await access.charge_tokens(request, request.state.usage.total_tokens)
    yield "data: [DONE]\n\n"
