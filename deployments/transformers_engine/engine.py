"""The HuggingFace transformers engine: a batched decode loop with per-row parameters."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import GenerationConfig

from deployments.config import EMBEDDED_SOURCE, ModelConfig
from deployments.engine import (
    SERVICE_DEFAULTS,
    Engine,
    PreparedRequest,
    SamplingDefaults,
    prepare_request,
    sequence_seed,
)
from deployments.model_source import resolve_model_source
from deployments.protocol import (
    FinishReason,
    GenerationParams,
    InvalidRequestError,
    ModelStatus,
    SequenceDelta,
)
from deployments.text_output import SequenceText
from deployments.transformers_engine.loading import (
    load_model_and_tokenizer,
    prepare_embedded_model,
    resolve_dtype,
)
from deployments.transformers_engine.sampling import BatchSampler, RowSampling

logger = logging.getLogger("ray.serve")

_FALLBACK_CONTEXT_LENGTH = 2048
_END_OF_BATCH = object()


def model_sampling_defaults(generation_config: GenerationConfig) -> SamplingDefaults:
    """Service defaults overridden by what the model's generation_config sets explicitly.

    Only values the model's authors wrote into generation_config.json count (transformers'
    own class defaults, such as top_k=50, do not), as in vLLM's `generation_config=auto`.
    An explicit ``do_sample: false`` makes greedy the model's default.
    """
    explicit = generation_config.to_diff_dict()
    defaults = dataclasses.asdict(SERVICE_DEFAULTS)
    for field in defaults:
        if explicit.get(field) is not None:
            defaults[field] = explicit[field]
    if explicit.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return SamplingDefaults(**defaults)


class _Sequence:
    """One returned sequence (a row of the decode batch) and its progress."""

    def __init__(self, request_index: int, index: int, request: PreparedRequest, decode) -> None:
        self.request_index = request_index
        self.index = index
        self.max_new_tokens = request.max_new_tokens
        self.text = SequenceText(decode, request.stop)
        self.generated = 0
        self.finished = False

    def advance(self, token_id: int, eos_token_ids: frozenset[int]) -> SequenceDelta:
        """Takes the next token; returns its delta (text possibly empty)."""
        self.generated += 1
        finish_reason: FinishReason | None = None
        if token_id in eos_token_ids:
            text, finish_reason = self.text.finish(), "eos"
        else:
            text = self.text.append(token_id)
            if self.text.stopped:
                finish_reason = "stop"
            elif self.generated >= self.max_new_tokens:
                text += self.text.finish()
                finish_reason = "length"
        self.finished = finish_reason is not None
        return SequenceDelta(self.index, text, self.generated, finish_reason)


class TransformersEngine(Engine):
    """Runs a HuggingFace causal LM with a hand-written decode loop.

    One forward pass per step for the whole batch (KV cache, left padding, explicit
    position ids); token selection per row by `BatchSampler`; finished rows leave the
    batch (and the KV cache) at once so they stop costing compute. The loop runs on a
    dedicated thread, never on the replica's event loop.
    """

    def __init__(self, config: ModelConfig, device: str) -> None:
        super().__init__(config, device)
        self._model = None
        self._tokenizer = None
        self._defaults = SERVICE_DEFAULTS
        self._eos_token_ids: frozenset[int] = frozenset()
        self._context_length = _FALLBACK_CONTEXT_LENGTH
        self._dtype = resolve_dtype(config.dtype, device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textgen-decode")

    def load(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the model deployment was placed for a GPU but CUDA is unavailable")
        if self.device == "cpu":
            torch.set_num_threads(self.config.cpu_threads or os.cpu_count() or 1)
        if self.config.source == EMBEDDED_SOURCE:
            prepare_embedded_model()
        location = resolve_model_source(self.config.source, self.config.revision)
        model, tokenizer = load_model_and_tokenizer(
            location, self.device, self._dtype, self.config.trust_remote_code
        )
        self._model, self._tokenizer = model, tokenizer
        self._defaults = model_sampling_defaults(model.generation_config)
        self._eos_token_ids = self._collect_eos_token_ids()
        limits = [
            limit
            for limit in (self.config.context_length, getattr(model.config, "max_position_embeddings", None))
            if limit
        ]
        self._context_length = min(limits, default=_FALLBACK_CONTEXT_LENGTH)
        logger.info(
            "loaded %s on %s (%s), context %d tokens, %d torch threads",
            self.config.source, self.device, self._dtype, self._context_length,
            torch.get_num_threads(),
        )

    def _collect_eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        configured = self._model.generation_config.eos_token_id
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(configured)
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return frozenset(ids)

    def status(self) -> ModelStatus:
        return ModelStatus(
            name=self.config.name,
            context_length=self._context_length,
            device=self.device,
            dtype=str(self._dtype).removeprefix("torch."),
        )

    def prepare(self, params: GenerationParams) -> PreparedRequest:
        if params.messages:
            if not self._tokenizer.chat_template:
                raise InvalidRequestError(
                    f"model {self.config.name} has no chat template; send a plain prompt "
                    "(/generate or /v1/completions) instead",
                    param="messages",
                )
            token_ids = self._tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in params.messages],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        else:
            token_ids = self._tokenizer(params.prompt, add_special_tokens=True)["input_ids"]
        return prepare_request(params, token_ids, self._context_length, self._defaults)

    def _decode_tokens(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    async def generate(
        self, batch: Sequence[PreparedRequest]
    ) -> AsyncIterator[list[list[SequenceDelta]]]:
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item) -> None:
            loop.call_soon_threadsafe(steps.put_nowait, item)

        def run() -> None:
            try:
                self._decode_batch(batch, emit, cancelled)
            finally:
                emit(_END_OF_BATCH)

        finished = loop.run_in_executor(self._executor, run)
        try:
            while (step := await steps.get()) is not _END_OF_BATCH:
                yield step
            await finished  # re-raises what the decode loop raised
        finally:
            cancelled.set()

    @torch.inference_mode()
    def _decode_batch(
        self,
        batch: Sequence[PreparedRequest],
        emit: Callable[[list[list[SequenceDelta]]], None],
        cancelled: threading.Event,
    ) -> None:
        model, device = self._model, self.device
        sequences = [
            _Sequence(request_index, index, request, self._decode_tokens)
            for request_index, request in enumerate(batch)
            for index in range(request.num_return_sequences)
        ]
        # Prefill each prompt once, then fan its cache and logits out to its sequences.
        width = max(len(request.prompt_token_ids) for request in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, request in enumerate(batch):
            prompt = torch.tensor(request.prompt_token_ids, dtype=torch.long)
            input_ids[row, width - len(prompt) :] = prompt
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = output.cache
        fan_out = torch.tensor([s.request_index for s in sequences], device=device)
        if len(sequences) != len(batch):
            cache.batch_select_indices(fan_out)
        logits = output.logits[:, -1, :].float()[fan_out]
        attention_mask = attention_mask[fan_out]
        last_position = position_ids[fan_out, -1]

        sampler = BatchSampler(
            [self._row_sampling(batch[s.request_index], s.index) for s in sequences],
            [batch[s.request_index].prompt_token_ids for s in sequences],
            vocab_size=logits.shape[-1],
            device=device,
        )
        while not cancelled.is_set():
            next_tokens = sampler.sample(logits)
            sampler.observe(next_tokens)
            step: list[list[SequenceDelta]] = [[] for _ in batch]
            still_running = []
            for row, (sequence, token_id) in enumerate(zip(sequences, next_tokens.tolist(), strict=True)):
                if batch[sequence.request_index].cancelled.is_set():
                    continue  # nobody reads it any more: free its row now
                step[sequence.request_index].append(sequence.advance(token_id, self._eos_token_ids))
                if not sequence.finished:
                    still_running.append(row)
            emit(step)
            if not still_running:
                return
            if len(still_running) < len(sequences):
                keep = torch.tensor(still_running, device=device)
                cache.batch_select_indices(keep)
                sampler.keep(keep)
                attention_mask, last_position = attention_mask[keep], last_position[keep]
                next_tokens = next_tokens[keep]
                sequences = [sequences[row] for row in still_running]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones(len(sequences), 1)], dim=1
            )
            last_position = last_position + 1
            output = model(
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=last_position[:, None],
                cache=cache,
                use_cache=True,
            )
            logits = output.logits[:, -1, :].float()

    @staticmethod
    def _row_sampling(request: PreparedRequest, index: int) -> RowSampling:
        seed = None if request.seed is None else sequence_seed(request.seed, index)
        return RowSampling(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            repetition_penalty=request.repetition_penalty,
            seed=seed,
        )

    def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError("model not loaded")
