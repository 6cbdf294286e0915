"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

Same validation, quotas, metrics and model calls as /generate; OpenAI's shapes, finish
reasons, streaming chunks (with `stream_options.include_usage`) and errors.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from pydantic import BaseModel

from deployments.protocol import SequenceDelta, ToolCallDelta
from serve_app import streaming
from serve_app.access import AccessControl
from serve_app.errors import ModelNotFoundError
from serve_app.openai_schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIUsage,
    ToolCallOut,
    openai_finish_reason,
)
from serve_app.schemas import Usage, usage_of

if TYPE_CHECKING:
    from serve_app.ingress import Ingress

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


# /v1 answers OpenAI's error shape, and never 422 (invalid parameters are 400 there).
OPENAI_ERRORS = {status: {"model": OpenAIError} for status in (400, 401, 404, 413, 415, 429, 500, 503, 504)}
OPENAI_ERRORS[422] = {"description": "Not used: invalid parameters are 400 on /v1.", "model": OpenAIError}
OPENAI_STREAMING_ERRORS = {
    **OPENAI_ERRORS,
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream is true."},
}


def add_openai_routes(app: FastAPI, ingress: Ingress, access: AccessControl) -> None:
    """Registers the /v1 routes on ``app``."""
    created = int(time.time())

    @app.get(
        "/v1/models", response_model=ModelList, responses=OPENAI_ERRORS, summary="The served models (OpenAI format)."
    )
    async def list_models() -> ModelList:
        return ModelList(data=model_cards())

    def model_cards() -> list[ModelCard]:
        """The models, then their adapters (with the model as `parent`, as vLLM lists them)."""
        bases = [ModelCard(id=name, created=created) for name in ingress.model_names]
        adapters = [ModelCard(id=name, created=created, parent=base) for name, base in ingress.adapter_names]
        return bases + adapters

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=OPENAI_ERRORS, summary="One served model.")
    async def get_model(model: str) -> ModelCard:
        for card in model_cards():
            if card.id == model:
                return card
        raise ModelNotFoundError(model, [card.id for card in model_cards()])

    @app.post(
        COMPLETIONS, response_model=CompletionResponse, responses=OPENAI_STREAMING_ERRORS,
        summary="Text completion (OpenAI format).",
    )
    async def completions(body: CompletionRequest, request: Request):
        handle = ingress.begin(request, body.model, body.prompt_length, "prompt")
        request_id = request.state.request_id
        response_id = f"cmpl-{request_id}"  # the request's one id, OpenAI's prefix
        if body.stream:
            prompt = body.prompts[0]
            params = body.to_generation_params(request_id, prompt)
            stream, start = await streaming.open_stream(request, access, handle, params)
            token_offsets = [0] * body.n  # where each choice's next token starts
            # Echo: each choice's first chunk starts with the prompt (and its scores), as
            # vLLM streams it; a prompt of token ids is echoed as the model's text of them.
            echoed = (prompt if isinstance(prompt, str) else start.prompt_text) if body.echo else ""
            unechoed = set(range(body.n)) if body.echo else set()

            usage_so_far = _UsageSoFar(start.prompt_tokens, body.n) if body.continuous_usage else None

            def chunk(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
                return _chunk(response_id, "text_completion", start.model, choice, body.include_usage, usage_so_far)

            def on_delta(delta: SequenceDelta, usage: Usage | None) -> list[dict]:
                if usage_so_far is not None:
                    usage_so_far.observe(delta)
                reason = openai_finish_reason(delta.finish_reason) if delta.finish_reason else None
                text, scored = delta.text, delta.logprobs
                if delta.index in unechoed:
                    unechoed.discard(delta.index)
                    text, scored = echoed + text, delta.prompt_logprobs + scored
                logprobs = None
                if body.logprobs is not None:
                    logprobs = CompletionLogprobs.of(scored, token_offsets[delta.index]).model_dump()
                    token_offsets[delta.index] += sum(len(entry.chosen.token) for entry in scored)
                return [chunk(delta.index, text, reason, logprobs)]

            return streaming.event_stream_response(
                streaming.relay(
                    request, access, stream, start, body.n, on_delta,
                    on_end=lambda usage: _usage_chunks(body.include_usage, response_id, "text_completion", start.model, usage),
                    openai=True,
                )
            )
        results = await streaming.generate(
            request, access, handle,
            *(body.to_generation_params(request_id, prompt) for prompt in body.prompts),
        )
        choices = []
        for position, (prompt, result) in enumerate(zip(body.prompts, results, strict=True)):
            echoed = ""
            if body.echo:  # a text prompt as sent; token ids as the model's text of them
                echoed = prompt if isinstance(prompt, str) else result.prompt_text
            for sequence in result.sequences:
                logprobs = None
                if body.logprobs is not None:
                    prompt_tokens = result.prompt_logprobs if body.echo else ()
                    logprobs = CompletionLogprobs.of(prompt_tokens + sequence.logprobs)
                choices.append(CompletionChoice(
                    index=position * body.n + sequence.index,
                    text=echoed + sequence.text,
                    logprobs=logprobs,
                    finish_reason=openai_finish_reason(sequence.finish_reason),
                ))
        return CompletionResponse(
            id=response_id, model=results[0].model, choices=choices, usage=OpenAIUsage.of(request.state.usage)
        )

    @app.post(
        CHAT_COMPLETIONS, response_model=ChatCompletionResponse, responses=OPENAI_STREAMING_ERRORS,
        summary="Chat completion (OpenAI format).",
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        handle = ingress.begin(request, body.model, body.prompt_chars, "messages")
        response_id = f"chatcmpl-{request.state.request_id}"
        params = body.to_generation_params(request.state.request_id)
        if body.stream:
            stream, start = await streaming.open_stream(request, access, handle, params)

            usage_so_far = _UsageSoFar(start.prompt_tokens, body.n) if body.continuous_usage else None

            def chunk(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
                return _chunk(response_id, "chat.completion.chunk", start.model, choice, body.include_usage, usage_so_far)

            def on_delta(delta: SequenceDelta, usage: Usage | None) -> list[dict]:
                if usage_so_far is not None:
                    usage_so_far.observe(delta)
                logprobs = ChatLogprobs.of(delta.logprobs).model_dump() if body.logprobs and delta.logprobs else None
                events = [chunk(delta.index, {"content": delta.text}, None, logprobs)] if delta.text or logprobs else []
                if delta.tool_calls:
                    events.append(chunk(delta.index, {"tool_calls": [_tool_call_piece(piece) for piece in delta.tool_calls]}, None))
                if delta.finish_reason:
                    events.append(chunk(delta.index, {}, openai_finish_reason(delta.finish_reason)))
                return events

            return streaming.event_stream_response(
                streaming.relay(
                    request, access, stream, start, body.n, on_delta,
                    on_end=lambda usage: _usage_chunks(body.include_usage, response_id, "chat.completion.chunk", start.model, usage),
                    openai=True,
                    first_events=[chunk(i, {"role": "assistant", "content": ""}, None) for i in range(body.n)],
                )
            )
        [result] = await streaming.generate(request, access, handle, params)
        return ChatCompletionResponse(
            id=response_id,
            model=result.model,
            choices=[
                ChatChoice(
                    index=sequence.index,
                    message=ChatMessageOut(
                        content=sequence.text or (None if sequence.tool_calls else ""),
                        tool_calls=[ToolCallOut.of(call) for call in sequence.tool_calls] or None,
                    ),
                    logprobs=ChatLogprobs.of(sequence.logprobs) if body.logprobs else None,
                    finish_reason=openai_finish_reason(sequence.finish_reason),
                )
                for sequence in result.sequences
            ],
            usage=OpenAIUsage.of(request.state.usage),
        )


def _tool_call_piece(piece: ToolCallDelta) -> dict:
    """OpenAI's streamed shape: the first piece of a call has its id, type and name."""
    if piece.id is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {"index": piece.index, "id": piece.id, "type": "function",
            "function": {"name": piece.name, "arguments": piece.arguments}}


class _UsageSoFar:
    """A stream's usage as its deltas arrive (vLLM's `continuous_usage_stats`)."""

    def __init__(self, prompt_tokens: int, sequences: int) -> None:
        self._prompt_tokens = prompt_tokens
        self._completion_tokens = [0] * sequences
        self._cached_tokens = 0

    def observe(self, delta: SequenceDelta) -> None:
        self._completion_tokens[delta.index] = delta.completion_tokens
        self._cached_tokens += delta.cached_tokens

    def body(self) -> dict:
        usage = usage_of(self._prompt_tokens, sum(self._completion_tokens), self._cached_tokens)
        return OpenAIUsage.of(usage).model_dump()


def _chunk(
    response_id: str, kind: str, model: str, choice: dict, include_usage: bool, usage_so_far: _UsageSoFar | None = None
) -> dict:
    """One streamed chunk; with include_usage every chunk carries `usage: null`, as at
    OpenAI, or with continuous usage (vLLM's) the usage so far."""
    event = {"id": response_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage_so_far is not None:
        event["usage"] = usage_so_far.body()
    elif include_usage:
        event["usage"] = None
    return event


def _usage_chunks(include_usage: bool, response_id: str, kind: str, model: str, usage: Usage) -> list[dict]:
    """OpenAI's last chunk when `stream_options.include_usage`: no choices, the usage."""
    if not include_usage:
        return []
    return [
        {"id": response_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
         "usage": OpenAIUsage.of(usage).model_dump()}
    ]
