"""The model deployment: one engine per replica, requests batched with `@serve.batch`.

A plain class; only the app builder wraps it with `serve.deployment`.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import AsyncIterator

from ray import serve

from deployments.config import ModelConfig
from deployments.engine import Engine, PreparedRequest
from deployments.protocol import (
    GenerationParams,
    GenerationResult,
    ModelStatus,
    SequenceDelta,
    SequenceResult,
    StreamStart,
)

logger = logging.getLogger("ray.serve")


def import_engine_class(path: str) -> type[Engine]:
    """Imports ``module:Class`` and checks that it is an Engine."""
    module_name, _, class_name = path.partition(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(engine_cls, type) and issubclass(engine_cls, Engine)):
        raise TypeError(f"{path} is not a subclass of deployments.engine.Engine")
    return engine_cls


def _sequences_in(batch: list[PreparedRequest]) -> int:
    return sum(request.num_return_sequences for request in batch)


async def collect_result(
    model: str, prepared: PreparedRequest, steps: AsyncIterator[list[SequenceDelta]]
) -> GenerationResult:
    """Joins a request's streamed deltas into its finished result."""
    texts = [""] * prepared.num_return_sequences
    finals: dict[int, SequenceDelta] = {}
    async for deltas in steps:
        for delta in deltas:
            texts[delta.index] += delta.text
            if delta.finish_reason is not None:
                finals[delta.index] = delta
    sequences = tuple(
        SequenceResult(
            index=index,
            text=texts[index],
            finish_reason=finals[index].finish_reason,
            completion_tokens=finals[index].completion_tokens,
        )
        for index in range(prepared.num_return_sequences)
    )
    return GenerationResult(
        model=model, prompt_tokens=len(prepared.prompt_token_ids), sequences=sequences
    )


class ModelServer:
    """Serves one model: loads it at start, then answers generate calls.

    Args:
        config: the model's validated configuration.
        device: ``cuda`` or ``cpu``, as resolved by the app builder.
    """

    def __init__(self, config: ModelConfig, device: str) -> None:
        self._config = config
        started = time.perf_counter()
        self._engine = import_engine_class(config.engine)(config, device)
        self._engine.load()
        logger.info(
            "model %s ready in %.1f s", config.name, time.perf_counter() - started
        )
        self._run_batch.set_max_batch_size(config.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def status(self) -> ModelStatus:
        """The loaded model; answering at all means the replica is ready."""
        return self._engine.status()

    async def generate(self, params: GenerationParams) -> GenerationResult:
        """Generates every requested sequence to the end.

        Raises:
            InvalidRequestError: the request does not fit the model (e.g. its context).
        """
        prepared = self._engine.prepare(params)
        return await collect_result(self._config.name, prepared, self._request_deltas(prepared))

    async def generate_stream(
        self, params: GenerationParams
    ) -> AsyncIterator[StreamStart | list[SequenceDelta]]:
        """Streams a request: a StreamStart, then each step's deltas.

        Validation happens before the first item, so the caller can peek at it and
        answer an invalid request with a real status code.
        """
        prepared = self._engine.prepare(params)
        yield StreamStart(model=self._config.name, prompt_tokens=len(prepared.prompt_token_ids))
        async for deltas in self._request_deltas(prepared):
            yield deltas

    async def _request_deltas(self, prepared: PreparedRequest) -> AsyncIterator[list[SequenceDelta]]:
        """The request's non-empty steps from its batch, until its last sequence ends."""
        unfinished = prepared.num_return_sequences
        async for deltas in self._run_batch(prepared):
            if not deltas:
                continue
            yield deltas
            unfinished -= sum(delta.finish_reason is not None for delta in deltas)
            if unfinished == 0:
                return

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy."""
        self._engine.check_health()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_sequences_in)
    async def _run_batch(
        self, batch: list[PreparedRequest]
    ) -> AsyncIterator[list[list[SequenceDelta] | type[StopIteration]]]:
        # serve.batch wants one entry per request at every yield; StopIteration ends a
        # request's own stream as soon as its sequences are done, so a short request
        # does not wait for the longest one in its batch.
        unfinished = [request.num_return_sequences for request in batch]
        async for step in self._engine.generate(batch):
            out: list[list[SequenceDelta] | type[StopIteration]] = []
            for position, deltas in enumerate(step):
                if unfinished[position] == 0:
                    out.append(StopIteration)
                    continue
                unfinished[position] -= sum(d.finish_reason is not None for d in deltas)
                out.append(deltas)
            yield out
