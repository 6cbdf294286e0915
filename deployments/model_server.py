"""The model deployment: one engine per replica, which batches concurrent requests at
every decode step (the engine's scheduler; `@serve.batch` forms a batch once, at
arrival, and runs it to the end).

A plain class; only the app builder wraps it with `serve.deployment`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from ray import serve

from deployments import metrics, tool_calls
from deployments.autoscaling import GenerationLoadReport
from deployments.config import ModelConfig
from deployments.engine import PreparedRequest, import_engine_class
from deployments.engine_process import EngineProcess
from deployments.protocol import (
    GenerationParams,
    GenerationResult,
    InvalidRequestError,
    ModelStatus,
    SequenceDelta,
    SequenceResult,
    StreamStart,
    TokenizeParams,
    TokenizeResult,
)

logger = logging.getLogger("ray.serve")
A = TypeVar("A")
R = TypeVar("R")
# How often a replica records each tenant's sequences, idle too: Ray drops a gauge's
# value not recorded within about two metric report intervals.
TENANT_GAUGES_INTERVAL_S = 1.0


async def collect_result(
    model: str, prepared: PreparedRequest, steps: AsyncIterator[list[SequenceDelta]]
) -> GenerationResult:
    """Joins a request's streamed deltas into its finished result."""
    texts = [""] * prepared.num_return_sequences
    logprobs: list[tuple] = [()] * prepared.num_return_sequences
    calls: list[tuple] = [()] * prepared.num_return_sequences
    finals: dict[int, SequenceDelta] = {}
    prompt_logprobs: tuple = ()
    cached_tokens = 0
    async for deltas in steps:
        for delta in deltas:
            prompt_logprobs = prompt_logprobs or delta.prompt_logprobs
            cached_tokens = cached_tokens or delta.cached_tokens
            texts[delta.index] += delta.text
            logprobs[delta.index] += delta.logprobs
            calls[delta.index] += delta.tool_calls
            if delta.finish_reason is not None:
                finals[delta.index] = delta
    sequences = tuple(
        SequenceResult(
            index=index,
            text=texts[index],
            finish_reason=finals[index].finish_reason,
            completion_tokens=finals[index].completion_tokens,
            logprobs=logprobs[index],
            tool_calls=tool_calls.join_calls(calls[index]),
        )
        for index in range(prepared.num_return_sequences)
    )
    return GenerationResult(
        model=model, prompt_tokens=len(prepared.prompt_token_ids), sequences=sequences,
        prompt_logprobs=prompt_logprobs, cached_tokens=cached_tokens,
    )


class _Owed:
    """What the replica still owes one request: its prompt until the first step comes
    back (prefill), then each unfinished sequence's remaining new tokens."""

    def __init__(self, prepared: PreparedRequest) -> None:
        self.prompt_tokens = len(prepared.prompt_token_ids)
        self.tenant = prepared.tenant
        self.max_new_tokens = prepared.max_new_tokens
        self.generated = [0] * prepared.num_return_sequences
        self.finished = [False] * prepared.num_return_sequences
        self.started = False

    def observe(self, deltas: list[SequenceDelta]) -> int:
        """Takes a step's deltas; returns the tokens they add."""
        self.started = True
        added = 0
        for delta in deltas:
            added += delta.completion_tokens - self.generated[delta.index]
            self.generated[delta.index] = delta.completion_tokens
            self.finished[delta.index] = delta.finish_reason is not None
        return added

    @property
    def completion_tokens(self) -> int:
        return sum(self.generated)

    @property
    def all_finished(self) -> bool:
        return all(self.finished)


class GenerationLoad:
    """The requests a replica holds and what it still owes them: the load it reports
    to the autoscaling policy (deployments.autoscaling) and to Prometheus."""

    def __init__(self) -> None:
        self._requests: set[_Owed] = set()

    @contextlib.contextmanager
    def holding(self, prepared: PreparedRequest):
        """Counts the request while the block runs; yields its `_Owed`."""
        owed = _Owed(prepared)
        self._requests.add(owed)
        try:
            yield owed
        finally:
            self._requests.discard(owed)

    def report(self) -> GenerationLoadReport:
        running = waiting = backlog = 0
        for owed in self._requests:
            unfinished = [g for g, done in zip(owed.generated, owed.finished, strict=True) if not done]
            backlog += sum(owed.max_new_tokens - generated for generated in unfinished)
            if owed.started:
                running += len(unfinished)
            else:
                waiting += len(unfinished)
                backlog += owed.prompt_tokens
        return GenerationLoadReport(running, waiting, backlog)

    def by_tenant(self) -> dict[str, tuple[int, int]]:
        """Each tenant's unfinished sequences: (running, waiting for a row)."""
        counts: dict[str, list[int]] = {}
        for owed in self._requests:
            counts.setdefault(owed.tenant, [0, 0])[0 if owed.started else 1] += owed.finished.count(False)
        return {tenant: (running, waiting) for tenant, (running, waiting) in counts.items()}


class ModelServer:
    """Serves one model: loads it at start, then answers generate calls.

    Args:
        config: the model's validated configuration.
        device: ``cuda`` or ``cpu``, as resolved by the app builder.
    """

    def __init__(self, config: ModelConfig, device: str) -> None:
        self._config = config
        self._load = GenerationLoad()
        self._tenant_gauges: asyncio.Task | None = None  # started by the first request
        started = time.perf_counter()
        if config.engine_process:
            self._engine = EngineProcess(config, device, on_exit=self._exit_with_engine)
        else:
            self._engine = import_engine_class(config.engine)(config, device)
        self._engine.load()
        load_seconds = time.perf_counter() - started
        # Serve routes a request for an adapter (its multiplexed model id) to a replica
        # that reported holding it; this reports the last `max_adapters` used here,
        # which the engine holds (it replaces the least recently used idle one).
        self._hold_adapter = None
        if config.adapters:
            async def held(adapter: str) -> str:
                return adapter

            self._hold_adapter = serve.multiplexed(max_num_models_per_replica=config.max_adapters)(held)
        metrics.record_model_load(config.name, load_seconds)
        logger.info("model %s ready in %.1f s", config.name, load_seconds)

    async def status(self) -> ModelStatus:
        """The loaded model; answering at all means the replica is ready."""
        return self._engine.status()

    async def generate(self, params: GenerationParams) -> GenerationResult | InvalidRequestError:
        """Generates every requested sequence to the end; a request that does not fit
        the model (its context, say) comes back as the InvalidRequestError saying why."""
        prepared = await self._prepare(params)
        if isinstance(prepared, InvalidRequestError):
            return prepared
        async with contextlib.aclosing(self._serve(prepared)) as steps:
            result = await collect_result(self._served_name(prepared), prepared, steps)
        text = await self._echoed_ids(params)
        return result if text is None else dataclasses.replace(result, prompt_text=text)

    async def _echoed_ids(self, params: GenerationParams) -> str | None:
        """The text an echo returns for a prompt of token ids (a text prompt is echoed
        as sent), decoded here, off the loop, rather than on the engine's scheduler
        thread; None when there is none to return."""
        if not params.echo or params.prompt_token_ids is None:
            return None
        return await asyncio.to_thread(self._engine.detokenize, params.prompt_token_ids)

    async def generate_stream(
        self, params: GenerationParams
    ) -> AsyncIterator[StreamStart | InvalidRequestError | list[SequenceDelta]]:
        """Streams a request: a StreamStart, then each step's deltas.

        Validation happens before the first item, so the caller can peek at it and
        answer an invalid request with a real status code: the first item is then the
        InvalidRequestError saying why, and the last.
        """
        prepared = await self._prepare(params)
        if isinstance(prepared, InvalidRequestError):
            yield prepared
            return
        yield StreamStart(self._served_name(prepared), len(prepared.prompt_token_ids), await self._echoed_ids(params))
        async with contextlib.aclosing(self._serve(prepared)) as steps:
            async for deltas in steps:
                yield deltas

    async def _prepare(self, params: GenerationParams) -> PreparedRequest | InvalidRequestError:
        """Tokenizes off the event loop: a chat template over many messages, or a long
        prompt, would stall every other request of the replica meanwhile (30,000
        one-character messages took 0.9 s of loop time).

        A client's mistake is returned, not raised: raised, it would cross the handle as
        a failed call, which Serve logs as an ERROR with a traceback in this replica's
        log. It is one INFO line here, and a 422 at the ingress.

        The request's LoRA adapter, if any, is Serve's multiplexed model id."""
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            params = dataclasses.replace(params, adapter=adapter)
            if self._hold_adapter is not None and adapter in self._config.adapters:
                await self._hold_adapter(adapter)
        return await self._off_the_loop(params.request_id, self._engine.prepare, params)

    def _served_name(self, prepared: PreparedRequest) -> str:
        """The model as the request named it: ``<model>:<adapter>`` for an adapter."""
        return self._config.name if prepared.adapter is None else f"{self._config.name}:{prepared.adapter}"

    async def tokenize(self, params: TokenizeParams, request_id: str) -> TokenizeResult | InvalidRequestError:
        """The prompt's or conversation's tokens, as a generation would see them, and the
        model's context; a refusal (no chat template) comes back as a value."""
        tokens = await self._off_the_loop(request_id, self._engine.tokenize, params)
        if isinstance(tokens, InvalidRequestError):
            return tokens
        return TokenizeResult(tuple(tokens), self._engine.status().context_length)

    async def detokenize(self, tokens: tuple[int, ...], request_id: str) -> str | InvalidRequestError:
        """The text of ``tokens``; an id the model does not have comes back as a value."""
        return await self._off_the_loop(request_id, self._engine.detokenize, tokens)

    async def tokenizer_info(self) -> dict:
        """The tokenizer's configuration (vLLM's /tokenizer_info)."""
        return self._engine.tokenizer_info()

    @staticmethod
    async def _off_the_loop(request_id: str, work: Callable[[A], R], argument: A) -> R | InvalidRequestError:
        """``work(argument)`` on a thread; its InvalidRequestError is returned and logged
        in one INFO line (see `_prepare`)."""
        try:
            return await asyncio.to_thread(work, argument)
        except InvalidRequestError as exc:
            logger.info("request_id=%s refused: %s", request_id, exc.message)
            return exc

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this every ``look_back_period_s`` / 5 when the deployment
        autoscales: the load the generation policy scales on, also exported as gauges.
        Async, so that it runs on the event loop that updates the load (Serve would run
        a plain method on a thread beside it)."""
        report = self._load.report()
        metrics.record_generation_load(self._config.name, report)
        return report.as_stats()

    async def _serve(self, prepared: PreparedRequest) -> AsyncIterator[list[SequenceDelta]]:
        """The request's steps from the engine: the one place that keeps a request's
        books (its load, metrics and log line). Deltas with no text (and no finish, no
        log probabilities) count their tokens but are not passed on. Closing it early (the caller left, or
        gave up) cancels the generation in the engine."""
        model = self._served_name(prepared)  # an adapter's metrics are its own
        timings = prepared.timings
        metrics.record_prompt_tokens(model, len(prepared.prompt_token_ids))
        readers = None
        if prepared.tool_format is not None:
            readers = tool_calls.ToolCallReaders(tool_calls.FORMATS[prepared.tool_format], prepared.num_return_sequences)
        if self._tenant_gauges is None:
            self._tenant_gauges = asyncio.get_running_loop().create_task(self._record_tenant_sequences())
        with self._load.holding(prepared) as owed:
            try:
                async for deltas in self._engine.generate(prepared):
                    if timings.first_token_at is None:
                        timings.first_token_at = time.monotonic()
                        metrics.record_time_to_first_token(model, timings.first_token_at - timings.received_at)
                        if timings.batch_started_at is not None:
                            metrics.record_queue_time(model, timings.batch_started_at - timings.received_at)
                    new_tokens = owed.observe(deltas)
                    if new_tokens:
                        metrics.record_completion_tokens(model, new_tokens)
                        metrics.record_tenant_completion_tokens(model, prepared.tenant, new_tokens)
                    if readers is not None:
                        deltas = readers.read(deltas)
                    visible = [
                        delta for delta in deltas
                        if delta.text or delta.finish_reason or delta.logprobs or delta.tool_calls
                        or delta.prompt_logprobs or delta.cached_tokens
                    ]
                    if visible:
                        yield visible
            finally:
                # Also reached when Serve cancels the call (client gone, caller gave
                # up): the engine then stops spending compute on the request.
                prepared.cancelled.set()
                self._log_request(prepared, owed)

    async def _record_tenant_sequences(self) -> None:
        """Records each tenant's running and waiting sequences every second."""
        while True:
            metrics.record_tenant_sequences(self._config.name, self._load.by_tenant())
            await asyncio.sleep(TENANT_GAUGES_INTERVAL_S)

    def _log_request(self, prepared: PreparedRequest, owed: _Owed) -> None:
        """One line per request on the model side, under the ingress's request id, with
        the tenant whose share of the batch it took; ``cancelled=True`` means its caller
        left before the end."""
        timings = prepared.timings

        def since_received(moment: float | None) -> str:
            return "-" if moment is None else f"{(moment - timings.received_at) * 1000:.1f}"

        logger.info(
            "request_id=%s tenant=%s prompt_tokens=%d completion_tokens=%d queue_ms=%s ttft_ms=%s "
            "total_ms=%.1f cancelled=%s",
            prepared.request_id,
            prepared.tenant or "-",
            owed.prompt_tokens,
            owed.completion_tokens,
            since_received(timings.batch_started_at),
            since_received(timings.first_token_at),
            (time.monotonic() - timings.received_at) * 1000,
            not owed.all_finished,
        )

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy."""
        self._engine.check_health()

    @staticmethod
    def _exit_with_engine(code: int) -> None:
        """A replica whose engine process died can only fail requests. Dying with it at
        once lets Serve replace it and lets the ingress retry the requests it held on
        another replica, rather than failing every request until the next health check.
        """
        logger.error("the engine process exited with code %d; this replica exits too", code)
        logging.shutdown()
        os._exit(1)

    def __del__(self) -> None:
        """Serve calls this when it shuts the replica down gracefully."""
        engine = getattr(self, "_engine", None)  # absent when loading failed
        if engine is not None:
            engine.close()
            # This replica's gauges would otherwise keep its last load after it is gone.
            metrics.record_generation_load(self._config.name, GenerationLoadReport(0, 0, 0))
