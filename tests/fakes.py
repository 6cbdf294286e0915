"""A deterministic fake engine, and a stand-in for a DeploymentHandle, for tests of the
HTTP side. Never the only test of a feature: the real engine is tested beside it.

The fake's tokens are characters: token id = code point. It writes a fixed text, rotated
by the seed and the sequence index, so tests can predict every character.
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence

from deployments.config import ModelConfig
from deployments.engine import Engine, PreparedRequest, prepare_request
from deployments.model_server import collect_result
from deployments.protocol import (
    AdapterLoadError,
    GenerationParams,
    InvalidRequestError,
    ModelStatus,
    SequenceDelta,
    StreamStart,
    TokenChoice,
    TokenizeParams,
    TokenizeResult,
    TokenLogprobs,
)
from deployments.text_output import SequenceText

FAKE_ENGINE = "tests.fakes:FakeEngine"
FAKE_TEXT = "The quick brown fox jumps over the lazy dog. "
FAKE_CONTEXT_LENGTH = 512


def fake_source(
    load_s: float = 0.0, step_s: float = 0.0, broken: bool = False, failing: bool = False, rows: int = 0,
    prepare_s: float = 0.0,
) -> str:
    """A `source` for FakeEngine: it sleeps ``load_s`` seconds in load() and ``step_s``
    per generated character; ``broken`` makes its health check and status fail;
    ``failing`` makes a prompt starting with "fail" raise FakeDecodeError after a step,
    one starting with "!" raise AdapterLoadError before any, and one starting with "#"
    break the engine (its health check fails from then on);
    ``rows`` > 0 lets at most that many sequences generate at once, the others wait for
    a row (a GPU replica's batch, whose step time hardly depends on its size);
    ``prepare_s`` blocks prepare() that long (a slow tokenizer or chat template)."""
    return (
        f"fake?load_s={load_s}&step_s={step_s}&broken={int(broken)}&failing={int(failing)}&rows={rows}"
        f"&prepare_s={prepare_s}"
    )


class FakeDecodeError(RuntimeError):
    """What a failing FakeEngine raises mid-generation."""


def fake_text(seed: int | None, index: int, length: int) -> str:
    offset = ((seed or 0) + index) % len(FAKE_TEXT)
    rotated = FAKE_TEXT[offset:] + FAKE_TEXT[:offset]
    return (rotated * (length // len(rotated) + 1))[:length]


class FakeEngine(Engine):
    """Writes `fake_text`, one character per step; honours stop, max tokens and
    cancellation. Each request runs on its own, in one of ``rows`` rows when set."""

    def __init__(self, config: ModelConfig, device: str) -> None:
        super().__init__(config, device)
        query = urllib.parse.parse_qs(urllib.parse.urlparse(config.source).query)
        self._load_s = float(query.get("load_s", ["0"])[0])
        self._step_s = float(query.get("step_s", ["0"])[0])
        self._prepare_s = float(query.get("prepare_s", ["0"])[0])
        self._broken = query.get("broken", ["0"])[0] == "1"
        self._failing = query.get("failing", ["0"])[0] == "1"
        rows = int(query.get("rows", ["0"])[0])
        self._rows = asyncio.Semaphore(rows) if rows else None
        self.loaded = False
        self._last_prompt: tuple[int, ...] = ()  # its "prefix cache": the previous prompt

    def load(self) -> None:
        time.sleep(self._load_s)
        self.loaded = True

    def frontend_state(self) -> None:
        return None  # prepare needs nothing from load

    def load_frontend(self, state: object) -> None:
        pass

    def status(self) -> ModelStatus:
        self.check_health()
        return ModelStatus(self.config.name, FAKE_CONTEXT_LENGTH, self.device, "fake")

    def check_health(self) -> None:
        if self._broken:
            raise RuntimeError("engine broken (fake)")

    def prepare(self, params: GenerationParams) -> PreparedRequest:
        time.sleep(self._prepare_s)
        tokens = params.prompt_token_ids
        if tokens is None:
            tokens = self.tokenize(TokenizeParams(params.prompt, params.messages))
        elif any(not 0 <= token < 0x110000 for token in tokens):
            raise InvalidRequestError("prompt: not a character", param="prompt")
        return prepare_request(params, tokens, FAKE_CONTEXT_LENGTH)

    def tokenize(self, params: TokenizeParams) -> list[int]:
        """A token per character (of the messages as "role: content" lines)."""
        text = "".join(f"{message.role}: {message.content}\n" for message in params.messages) or params.prompt
        return [ord(c) for c in text]

    def tokenizer_info(self) -> dict:
        return {"tokenizer_class": "FakeCharacterTokenizer", "model_max_length": FAKE_CONTEXT_LENGTH}

    def detokenize(self, tokens: Sequence[int]) -> str:
        if any(not 0 <= token < 0x110000 for token in tokens):
            raise InvalidRequestError("tokens: not a character", param="tokens")
        return "".join(chr(token) for token in tokens)

    async def generate(self, request: PreparedRequest) -> AsyncIterator[list[SequenceDelta]]:
        async with contextlib.AsyncExitStack() as rows:
            if self._rows is not None:
                for _ in range(request.num_return_sequences):
                    await rows.enter_async_context(self._rows)
            async for deltas in self._generate(request):
                yield deltas

    async def _generate(self, request: PreparedRequest) -> AsyncIterator[list[SequenceDelta]]:
        def decode(ids: Sequence[int]) -> str:
            return "".join(chr(i) for i in ids)

        rows = [
            (index, SequenceText(decode, request.stop), fake_text(request.seed, index, request.max_new_tokens))
            for index in range(request.num_return_sequences)
        ]
        finished: set[int] = set()
        # As a prefix cache reports: the tokens shared with the previous prompt, short
        # of the last one, on sequence 0's first delta.
        prompt, previous = request.prompt_token_ids, self._last_prompt
        shared = zip(prompt[:-1], previous, strict=False)
        cached = next((at for at, (mine, theirs) in enumerate(shared) if mine != theirs), min(len(prompt) - 1, len(previous)))
        self._last_prompt = tuple(prompt)
        scored = ()
        if request.prompt_logprobs is not None:  # the prompt's characters, each as likely as can be
            scored = tuple(
                TokenLogprobs(TokenChoice(token, chr(token), None if at == 0 else 0.0))
                for at, token in enumerate(request.prompt_token_ids)
            )
        if request.max_new_tokens == 0:
            yield [SequenceDelta(index, "", 0, "length", prompt_logprobs=scored)  # each sequence's, as the engine's
                   for index in range(request.num_return_sequences)]
            return
        for step in range(request.max_new_tokens):
            await asyncio.sleep(self._step_s)
            if request.cancelled.is_set():
                return
            if step == 1 and self._failing and chr(request.prompt_token_ids[0]) == "f":
                raise FakeDecodeError(f"fake decode failure in request {request.request_id}")
            if step == 0 and self._failing and chr(request.prompt_token_ids[0]) == "!":
                raise AdapterLoadError("broken", "its weights could not be read")
            if step == 0 and self._failing and chr(request.prompt_token_ids[0]) == "#":
                self._broken = True  # as an engine whose steps kept failing: its health check fails
                raise FakeDecodeError("fake engine broken by this request")
            out: list[SequenceDelta] = []
            for index, text, planned in rows:
                if index in finished:
                    continue
                emitted = text.append(ord(planned[step]))
                reason = None
                if text.stopped:
                    reason = "stop"
                elif step + 1 == request.max_new_tokens:
                    emitted, reason = emitted + text.finish(), "length"
                if reason:
                    finished.add(index)
                out.append(SequenceDelta(index, emitted, step + 1, reason, prompt_logprobs=scored,
                                         cached_tokens=cached if index == 0 else 0))
            scored, cached = (), 0
            yield out
            if len(finished) == len(rows):
                return


class _Call:
    def __init__(self, function, stream: bool) -> None:
        self._function, self._stream = function, stream

    def remote(self, *args):
        if self._stream:
            return _FakeStream(self._function(*args))
        # A task, like a DeploymentResponse: already running, awaitable, cancellable.
        return asyncio.ensure_future(self._function(*args))


class _FakeStream:
    def __init__(self, generator) -> None:
        self._generator = generator

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._generator.__anext__()

    def cancel(self) -> None:
        pass


class FakeModelHandle:
    """Answers like a DeploymentHandle to ModelServer, backed by an engine directly
    (one request per batch: serve.batch only runs inside a Serve replica)."""

    def __init__(self, engine: Engine, stream: bool = False) -> None:
        self._engine, self._stream = engine, stream
        self.deployment_name = f"Model-{engine.config.name}"

    def options(self, stream: bool | None = None, multiplexed_model_id: str | None = None) -> "FakeModelHandle":
        """Like DeploymentHandle.options: what is not given is kept. (The fake engine
        has no adapters: a multiplexed model id changes nothing here.)"""
        return FakeModelHandle(self._engine, self._stream if stream is None else stream)

    def __getattr__(self, method: str) -> _Call:
        return _Call(getattr(self, f"_{method}"), self._stream)

    async def _status(self) -> ModelStatus:
        return self._engine.status()

    async def _tokenize(self, params: TokenizeParams, request_id: str):
        try:  # refusals come back as values, as from ModelServer
            return TokenizeResult(tuple(self._engine.tokenize(params)), self._engine.status().context_length)
        except InvalidRequestError as exc:
            return exc

    async def _tokenizer_info(self):
        return self._engine.tokenizer_info()

    async def _detokenize(self, tokens: tuple[int, ...], request_id: str):
        try:
            return self._engine.detokenize(tokens)
        except InvalidRequestError as exc:
            return exc

    async def _generate(self, params: GenerationParams):
        try:  # a refusal comes back as a value, as from ModelServer
            prepared = self._engine.prepare(params)
        except InvalidRequestError as exc:
            return exc
        result = await collect_result(self._engine.config.name, prepared, self._deltas(prepared))
        text = self._echoed_ids(params)
        return result if text is None else dataclasses.replace(result, prompt_text=text)

    def _echoed_ids(self, params: GenerationParams) -> str | None:  # as ModelServer's
        if not params.echo or params.prompt_token_ids is None:
            return None
        return self._engine.detokenize(params.prompt_token_ids)

    async def _generate_stream(self, params: GenerationParams):
        try:
            prepared = self._engine.prepare(params)
        except InvalidRequestError as exc:
            yield exc
            return
        yield StreamStart(self._engine.config.name, len(prepared.prompt_token_ids), self._echoed_ids(params))
        async for deltas in self._deltas(prepared):
            yield deltas

    async def _deltas(self, prepared: PreparedRequest):
        async for deltas in self._engine.generate(prepared):
            visible = [delta for delta in deltas if delta.text or delta.finish_reason or delta.prompt_logprobs]
            if visible:
                yield visible
