"""The engine protocol: what a model deployment needs from a text-generation backend.

A ModelServer replica owns one engine. The engine tokenizes and validates a request
(`prepare`), then decodes batches of prepared requests (`generate`), each request with
its own sampling parameters, stop strings, seed and length.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import importlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence

from deployments.config import ModelConfig
from deployments.protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS,
    GenerationParams,
    InvalidRequestError,
    ModelStatus,
    OutputConstraint,
    SequenceDelta,
    TokenizeParams,
)


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Values used where neither the request nor the model's generation_config sets one."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


SERVICE_DEFAULTS = SamplingDefaults()


@dataclasses.dataclass
class RequestTimings:
    """Moments of a request's life in a model replica (``time.monotonic()`` seconds)."""

    received_at: float = dataclasses.field(default_factory=time.monotonic)
    batch_started_at: float | None = None
    first_token_at: float | None = None


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """A validated request with its prompt tokenized and every parameter resolved."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: tuple[str, ...]
    seed: int | None
    num_return_sequences: int
    constraint: OutputConstraint | None
    logprobs: int | None
    adapter: str | None
    # With tools: the call syntax (deployments.tool_calls.FORMATS) the model replica reads
    # the text with; None reads none.
    tool_format: str | None = None
    # Whether special tokens are left out of the text (a format's marker may be one).
    skip_special_tokens: bool = True
    # vLLM's extensions (GenerationParams says what each does).
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    tenant: str = ""
    tenant_weight: float = 1.0
    priority: int = 0
    # Set when nobody waits for the result any more (the client left, the caller timed
    # out, a quota refused it): the engine drops the request's rows at its next step.
    cancelled: threading.Event = dataclasses.field(
        default_factory=threading.Event, compare=False, repr=False
    )
    timings: RequestTimings = dataclasses.field(
        default_factory=RequestTimings, compare=False, repr=False
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def prepare_request(
    params: GenerationParams,
    prompt_token_ids: Sequence[int],
    context_length: int,
    defaults: SamplingDefaults = SERVICE_DEFAULTS,
) -> PreparedRequest:
    """Resolves a request's parameters and checks that it fits the model's context.

    Precedence: the request's own value, else ``defaults`` (which an engine builds from
    the model's generation_config on top of SERVICE_DEFAULTS).

    Raises:
        InvalidRequestError: the prompt is empty after tokenization, ``max_length`` does
            not leave room for a new token, or prompt + new tokens exceed the context.
    """
    prompt_tokens = len(prompt_token_ids)
    if prompt_tokens == 0:
        raise InvalidRequestError("prompt produced no tokens", param="prompt")
    if params.max_length is not None:
        max_new_tokens = params.max_length - prompt_tokens
        if max_new_tokens < 1:
            raise InvalidRequestError(
                f"max_length ({params.max_length}) counts the prompt too and must exceed "
                f"its {prompt_tokens} tokens; use max_new_tokens to set only the new tokens",
                param="max_length",
            )
    else:
        max_new_tokens = (
            params.max_new_tokens if params.max_new_tokens is not None else defaults.max_new_tokens
        )
        if max_new_tokens == 0 and not params.echo:
            raise InvalidRequestError("0 new tokens returns nothing without echo", param="max_new_tokens")
    # One cap for every way of asking (max_length and a model's default included).
    max_new_tokens = min(max_new_tokens, MAX_NEW_TOKENS)
    if prompt_tokens + max_new_tokens > context_length:
        length_param = "max_length" if params.max_length is not None else "max_new_tokens"
        raise InvalidRequestError(
            f"prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked "
            f"for: {prompt_tokens + max_new_tokens} exceeds the model's context of "
            f"{context_length} tokens; shorten the prompt or lower {length_param}",
            param=length_param,
        )

    if params.min_tokens > max_new_tokens:
        raise InvalidRequestError(
            f"min_tokens ({params.min_tokens}) exceeds the {max_new_tokens} new tokens this request may "
            "generate; lower min_tokens or raise the token limit",
            param="min_tokens",
        )

    def pick(value, default):
        return default if value is None else value

    return PreparedRequest(
        request_id=params.request_id,
        prompt_token_ids=tuple(prompt_token_ids),
        max_new_tokens=max_new_tokens,
        temperature=float(pick(params.temperature, defaults.temperature)),
        top_p=float(pick(params.top_p, defaults.top_p)),
        top_k=int(pick(params.top_k, defaults.top_k)),
        repetition_penalty=float(pick(params.repetition_penalty, defaults.repetition_penalty)),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        stop=params.stop,
        seed=params.seed,
        num_return_sequences=params.num_return_sequences,
        constraint=params.constraint,
        logprobs=params.logprobs,
        adapter=params.adapter,
        skip_special_tokens=params.skip_special_tokens,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        stop_token_ids=params.stop_token_ids,
        include_stop_str_in_output=params.include_stop_str_in_output,
        prompt_logprobs=params.prompt_logprobs,
        tenant=params.tenant,
        tenant_weight=params.tenant_weight,
        priority=params.priority,
    )


def sequence_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th returned sequence of a request seeded with ``seed``.

    Sequence 0 uses the request's seed itself, so ``n=1`` reproduces the first sequence
    of ``n=4``; the others are spread by a large odd constant so they do not collide
    with a neighbouring request seed.
    """
    return (seed + index * 0x9E3779B97F4A7C15) % (1 << 63)


def merge_steps(earlier: list[SequenceDelta], later: list[SequenceDelta]) -> list[SequenceDelta]:
    """One delta per sequence for two consecutive steps: texts and log probabilities
    joined, the later count and finish reason."""
    merged = {delta.index: delta for delta in earlier}
    for delta in later:
        before = merged.get(delta.index)
        text = before.text + delta.text if before else delta.text
        logprobs = before.logprobs + delta.logprobs if before else delta.logprobs
        merged[delta.index] = dataclasses.replace(
            delta, text=text, logprobs=logprobs,
            tool_calls=before.tool_calls + delta.tool_calls if before else delta.tool_calls,
            prompt_logprobs=before.prompt_logprobs if before and before.prompt_logprobs else delta.prompt_logprobs,
            cached_tokens=before.cached_tokens if before and before.cached_tokens else delta.cached_tokens,
        )
    return list(merged.values())


# Put on a relayed queue when a request's steps end before every sequence finished
# (its rows were dropped because nobody waits for them any more).
END_OF_STEPS = object()


async def relay_steps(outputs: asyncio.Queue, sequences: int) -> AsyncIterator[list[SequenceDelta]]:
    """Yields the steps another thread puts on ``outputs`` until all ``sequences`` have
    finished. Steps that piled up while the caller was busy go out as one: under load
    that saves a message per token through every process of the stream. An exception
    put there is raised; END_OF_STEPS ends the iteration early."""
    ready: deque = deque()
    while sequences:
        if not ready:
            ready.append(await outputs.get())
        while not outputs.empty():
            ready.append(outputs.get_nowait())
        item = ready.popleft()
        while isinstance(item, list) and ready and isinstance(ready[0], list):
            item = merge_steps(item, ready.popleft())
        if item is END_OF_STEPS:
            return
        if isinstance(item, BaseException):
            raise item
        sequences -= sum(delta.finish_reason is not None for delta in item)
        yield item


def import_engine_class(path: str) -> type[Engine]:
    """Imports ``module:Class`` and checks that it is an Engine."""
    module_name, _, class_name = path.partition(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(engine_cls, type) and issubclass(engine_cls, Engine)):
        raise TypeError(f"{path} is not a subclass of deployments.engine.Engine")
    return engine_cls


class Engine(abc.ABC):
    """A text-generation backend, one instance per model replica; it batches the
    requests it is given concurrently.

    Args:
        config: the validated model configuration.
        device: ``cuda`` or ``cpu``, resolved by the app builder from the accelerator.
    """

    def __init__(self, config: ModelConfig, device: str) -> None:
        self.config = config
        self.device = device

    @abc.abstractmethod
    def load(self) -> None:
        """Loads weights and tokenizer; blocking, called once before serving."""

    def frontend_state(self) -> object:
        """What `load_frontend` needs from this loaded engine (picklable): values read
        from the model, so that a frontend copy prepares requests exactly as this engine
        would. Engines that run in an engine process (deployments.engine_process)
        implement it and `load_frontend`; others always run in the replica's process."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in an engine process")

    def load_frontend(self, state: object) -> None:
        """Loads only what `prepare` needs (a tokenizer, not the model), given the
        `frontend_state` of a loaded copy of this engine in the engine process."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in an engine process")

    @abc.abstractmethod
    def status(self) -> ModelStatus:
        """Describes the loaded model."""

    @abc.abstractmethod
    def prepare(self, params: GenerationParams) -> PreparedRequest:
        """Tokenizes and validates a request (fast; runs on the replica's event loop).

        Raises:
            InvalidRequestError: the request cannot be served as asked.
        """

    @abc.abstractmethod
    def tokenize(self, params: TokenizeParams) -> list[int]:
        """The token ids of a prompt or conversation, as `prepare` would make them.

        Raises:
            InvalidRequestError: messages for a model without a chat template.
        """

    @abc.abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``, special tokens included.

        Raises:
            InvalidRequestError: an id the tokenizer does not have.
        """

    @abc.abstractmethod
    def tokenizer_info(self) -> dict:
        """The tokenizer's configuration as JSON (vLLM's /tokenizer_info: what its
        tokenizer_config.json holds, its class, the chat template)."""

    @abc.abstractmethod
    def generate(self, request: PreparedRequest) -> AsyncIterator[list[SequenceDelta]]:
        """Generates one request; an async generator yielding once per decode step.

        The engine batches concurrent calls itself. Each yield holds at most one delta
        per sequence of the request: what it generated since the previous yield (one
        step, or several merged when the caller was slower than the engine). Its text
        may be empty (a token can complete no character yet, or be held back as the
        start of a stop string); ``completion_tokens`` counts the sequence's tokens so
        far. Every sequence's last delta has a ``finish_reason``; the generator ends
        after the last sequence's. When the caller stops iterating, or sets
        ``request.cancelled``, the engine stops spending compute on the request.
        Blocking work must run off the caller's event loop.
        """

    def check_health(self) -> None:
        """Raises if the engine can no longer serve (not merely when it is busy)."""

    def close(self) -> None:
        """Releases what `load` started (the replica is shutting down)."""
