"""The HuggingFace transformers engine: continuous batching with per-row parameters.

A scheduler thread owns the model. Between two decode steps it admits waiting requests
(prefilled in groups of similar prompt length, a chunk per step), joins their KV cache
to the running batch, and drops finished or cancelled rows, so a short request never
waits for a long one and a new request never waits for a batch to drain
(iteration-level batching, as in Orca, vLLM and TGI).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import inspect
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

import torch
from transformers import GenerationConfig

from deployments import metrics, tool_calls
from deployments.config import EMBEDDED_SOURCE, ModelConfig
from deployments.engine import (
    END_OF_STEPS,
    SERVICE_DEFAULTS,
    Engine,
    PreparedRequest,
    SamplingDefaults,
    merge_steps,
    prepare_request,
    relay_steps,
    sequence_seed,
)
from deployments.model_source import ModelLocation, resolve_adapter_source, resolve_model_source
from deployments.protocol import (
    FinishReason,
    GenerationParams,
    InvalidRequestError,
    MAX_TOP_LOGPROBS,
    ModelStatus,
    OutputConstraint,
    SequenceDelta,
    TokenChoice,
    TokenizeParams,
    TokenLogprobs,
    ToolUse,
)
from deployments.text_output import SequenceText
from deployments.transformers_engine import kv_cache
from deployments.transformers_engine.grammars import Grammars, mask_disallowed
from deployments.transformers_engine.lora import Adapters
from deployments.transformers_engine.prompt_scores import PromptScores, output_layer
from deployments.transformers_engine.loading import (
    load_model,
    load_tokenizer,
    tokenizer_config,
    prepare_embedded_model,
    resolve_dtype,
)
from deployments.transformers_engine.sampling import BatchSampler, RowSampling, RowScores, score_rows
from deployments.transformers_engine.slot_decoder import SlotDecoder, SlotShape, Tokens, tokens_per_slot

logger = logging.getLogger("ray.serve")

_FALLBACK_CONTEXT_LENGTH = 2048
# Prompt tokens one admission wave may prefill (the first waiting request is always
# admitted).
MAX_PREFILL_TOKENS = 8192
# Prompt tokens (rows x columns) prefilled between two decode steps: long prompts are
# prefilled in chunks, so running rows stall for one chunk at a time, not a whole prompt.
# With no row running, nobody stalls: a group is prefilled whole. On a GPU an eager
# forward pass costs about the same for 1 or 2048 tokens (the host sets the pace).
PREFILL_CHUNK_TOKENS = 256
GPU_PREFILL_CHUNK_TOKENS = 2048
# Prompts prefilled together are left-padded to the longest; a prompt joins a group
# only while the padding stays within this share of the group's real tokens (plus a
# few columns, so that short prompts still share a pass).
PREFILL_PADDING_SHARE = 0.25
PREFILL_PADDING_ALLOWANCE = 16
# Failed scheduler iterations in a row after which the engine reports itself broken.
BROKEN_AFTER_FAILURES = 3
# GPU memory kept out of the slot KV cache for activations, logits and CUDA graphs.
ACTIVATION_RESERVE_BYTES = 2 << 30
# Fewest tokens per slot worth serving with.
MIN_SLOT_LENGTH = 64


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


def prefill_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Splits an admission wave (prompt lengths) into groups prefilled together, shortest
    first, so that left padding wastes little: under mixed load, one wave padded to its
    longest prompt computed 2.4 times the real prompt tokens (bench/throughput.py mix).
    Returns indices into ``lengths``."""
    groups: list[list[int]] = []
    useful = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        width = lengths[index]  # ascending: the newest prompt is the group's widest
        if groups and width * (len(groups[-1]) + 1) <= (useful + width) * (1 + PREFILL_PADDING_SHARE) + PREFILL_PADDING_ALLOWANCE:
            groups[-1].append(index)
            useful += width
        else:
            groups.append([index])
            useful = width
    return groups


class _Outbox:
    """Carries a request's steps from the scheduler thread to its caller's event loop,
    at most one hand-over per ``interval_s``, and none while the previous one has not
    been taken yet (its caller is busy): steps meanwhile are merged, so a caller that
    keeps up gets every step as it is made, and a slow one as much as piled up at once.
    The first and any finishing step go at once; an error or a drop flushes what is held.

    Every hand-over wakes the caller's event loop and, in the service, the replica, the
    ingress and the proxy on the way to the client. With the engine inside the replica
    (`engine_process: false`) that Python work also holds the scheduler's GIL: at 16
    streamed clients a decode forward pass took 133 ms there with a hand-over per step,
    120 ms with one per 0.25 s, 106 ms unstreamed, 91-98 ms in a plain process.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, interval_s: float) -> None:
        self._loop, self._outputs, self._interval_s = loop, outputs, interval_s
        self._held: list[SequenceDelta] | None = None
        self._last_sent: float | None = None
        # Hand-overs sent (counted by the scheduler thread) and put on the queue (by the
        # event loop): each counter has one writer, so no lock is needed.
        self._sent = 0
        self._arrived = 0

    def deliver(self, item: object) -> None:
        """Takes a step's deltas, an exception or END_OF_STEPS (scheduler thread only)."""
        if isinstance(item, list):
            self._held = merge_steps(self._held, item) if self._held else item
            now = time.monotonic()
            due = self._last_sent is None or now - self._last_sent >= self._interval_s
            if (due and not self._in_flight()) or any(delta.finish_reason is not None for delta in item):
                self._send(self._held)
                self._held, self._last_sent = None, now
            return
        if self._held:
            self._send(self._held)
            self._held = None
        self._send(item)

    def _in_flight(self) -> bool:
        """Whether an earlier hand-over has not reached its caller's queue, or waits
        there unread (reading a deque's length from this thread is safe)."""
        return self._arrived < self._sent or self._outputs.qsize() > 0

    def _send(self, item: object) -> None:
        self._sent += 1
        self._loop.call_soon_threadsafe(self._arrive, item)

    def _arrive(self, item: object) -> None:
        self._arrived += 1
        self._outputs.put_nowait(item)


@dataclasses.dataclass(frozen=True)
class _FrontendState:
    """What a replica-side copy of the engine needs to prepare requests as the model's
    own process does (TransformersEngine.frontend_state)."""

    context_length: int
    defaults: SamplingDefaults
    vocab_size: int  # the logits' width
    eos_token_ids: frozenset[int]


class _Admission:
    """A request handed to the scheduler, with the way back to its caller."""

    def __init__(self, request: PreparedRequest, outbox: _Outbox) -> None:
        self.request = request
        self.deliver = outbox.deliver
        self.adapter_slot = 0  # its LoRA adapter's slot once admitted (0: the base model)


class _Sequence:
    """One returned sequence (a row of the running batch) and its progress; ``grammar``
    is the matcher of its output constraint, if it has one."""

    def __init__(
        self, admission: _Admission, index: int, decode: Callable[[Sequence[int]], str], grammar=None
    ) -> None:
        request = admission.request
        self.admission = admission
        self.index = index
        self.max_new_tokens = request.max_new_tokens
        self.text = SequenceText(decode, request.stop, request.include_stop_str_in_output)
        self.grammar = grammar
        # A grammar must end where it ends: ignore_eos applies to free rows only.
        self.ignore_eos = request.ignore_eos and grammar is None
        self.min_tokens = request.min_tokens
        self.stop_token_ids = frozenset(request.stop_token_ids)
        self.include_stop = request.include_stop_str_in_output
        self.prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # sent with the first delta (sequence 0)
        self.logprobs = admission.request.logprobs  # None, or how many alternatives to show
        self.generated = 0
        self.finished = False

    def advance(
        self, token_id: int, eos_token_ids: frozenset[int], logprobs: TokenLogprobs | None = None
    ) -> SequenceDelta:
        """Takes the next token (and its log probabilities, if asked for); returns its
        delta (text possibly empty). A constrained sequence ends as at EOS once its text
        is complete (nothing but EOS may follow); one of ``stop_token_ids`` ends it as a
        stop string does (its text kept only with include_stop_str_in_output)."""
        self.generated += 1
        finish_reason: FinishReason | None = None
        ends = token_id in eos_token_ids and not self.ignore_eos
        if token_id in self.stop_token_ids and not ends:
            text = self.text.append(token_id) if self.include_stop else ""
            text, finish_reason = text + self.text.finish(), "stop"
        elif ends:
            text, finish_reason = self.text.finish(), "eos"
        else:
            text = self.text.append(token_id)
            if self.grammar is not None:
                self.grammar.consume_token(token_id)
            if self.text.stopped:
                finish_reason = "stop"
            elif self.grammar is not None and self.grammar.is_stopped():
                text += self.text.finish()
                finish_reason = "eos"
            elif self.generated >= self.max_new_tokens:
                text += self.text.finish()
                finish_reason = "length"
        self.finished = finish_reason is not None
        scored = (logprobs,) if logprobs is not None and not ends else ()
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, ()
        return SequenceDelta(self.index, text, self.generated, finish_reason, scored, prompt_logprobs=prompt_logprobs)

    @property
    def masked(self) -> bool:
        """Whether its next token is restricted: by a grammar, or (before min_tokens) to
        anything but an end."""
        return self.grammar is not None or self.generated < self.min_tokens


@dataclasses.dataclass
class _Batch:
    """The rows being decoded, left-padded: every row's history ends at the last column
    of ``attention_mask`` and of the KV cache."""

    sequences: list[_Sequence]
    cache: object  # transformers' DynamicCache
    attention_mask: torch.Tensor  # [rows, columns]
    last_position: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab]: scores of each row's next token, not yet sampled
    sampler: BatchSampler

    @classmethod
    def of(cls, prefilled: _Prefilled, joinable: bool) -> _Batch:
        if joinable:  # all layers keep full history: decode steps write in place
            kv_cache.growing(prefilled.cache)
        return cls(
            sequences=prefilled.sequences,
            cache=prefilled.cache,
            attention_mask=prefilled.attention_mask,
            last_position=prefilled.last_position,
            logits=prefilled.logits,
            sampler=BatchSampler(
                prefilled.sampling,
                prefilled.prompts,
                vocab_size=prefilled.logits.shape[-1],
                device=prefilled.logits.device,
            ),
        )

    def join(self, other: _Batch) -> None:
        """Appends ``other``'s rows (newly prefilled requests)."""
        kv_cache.join(self.cache, other.cache)
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])

        def left_padded(mask: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))

        self.attention_mask = torch.cat([left_padded(self.attention_mask), left_padded(other.attention_mask)])
        self.last_position = torch.cat([self.last_position, other.last_position])
        self.logits = torch.cat([self.logits, other.logits])
        self.sampler.join(other.sampler)
        self.sequences = self.sequences + other.sequences

    def keep(self, rows: list[int]) -> None:
        """Keeps only ``rows`` (a non-empty subset, in order), then drops the history
        columns that no remaining row attends to."""
        if len(rows) == len(self.sequences):
            return
        index = torch.tensor(rows, device=self.logits.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.last_position = self.last_position[index]
        self.logits = self.logits[index]
        self.sampler.keep(index)
        self.sequences = [self.sequences[row] for row in rows]
        unused = int(self.attention_mask.any(dim=0).int().argmax())
        if unused:
            kv_cache.drop_leading_columns(self.cache, unused)
            self.attention_mask = self.attention_mask[:, unused:]


@dataclasses.dataclass
class _Prefill:
    """Admitted requests whose prompts are being run, a chunk of columns per scheduler
    iteration, before they join the running batch."""

    admitted: list[_Admission]
    input_ids: torch.Tensor  # [requests, width], left-padded prompts
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    done: int = 0  # columns already run
    cache: object = None
    scores: PromptScores | None = None  # when a request asked for prompt log probabilities

    @property
    def finished(self) -> bool:
        return self.done == self.input_ids.shape[1]


@dataclasses.dataclass
class _Prefilled:
    """Prompts fully run: a row per returned sequence, left-padded, with the scores of
    each row's first new token."""

    sequences: list[_Sequence]
    sampling: list[RowSampling]
    cache: object  # transformers' DynamicCache
    attention_mask: torch.Tensor  # [rows, columns]
    last_position: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab], float32

    @property
    def prompts(self) -> list[tuple[int, ...]]:
        return [sequence.admission.request.prompt_token_ids for sequence in self.sequences]


class TransformersEngine(Engine):
    """Runs a HuggingFace causal LM with its own continuous-batching decode loop.

    One forward pass per step for every running row (KV cache, left padding, explicit
    position ids); token selection per row by `BatchSampler`; finished and cancelled rows
    leave at once. The loop runs on the scheduler thread, never on the replica's event
    loop. Models whose cache layers cannot be joined (sliding windows) are batched
    statically: newcomers wait for the running batch to finish.
    """

    def __init__(self, config: ModelConfig, device: str) -> None:
        super().__init__(config, device)
        self._model = None
        self._tokenizer = None
        self._defaults = SERVICE_DEFAULTS
        self._eos_token_ids: frozenset[int] = frozenset()
        self._grammars: Grammars | None = None
        self._adapters: Adapters | None = None
        self._vocab_size = 0
        self._token_texts: dict[int, str] = {}  # each token's text alone (log probabilities)
        self._context_length = _FALLBACK_CONTEXT_LENGTH
        self._dtype = resolve_dtype(config.dtype, device)
        self._template_takes_tools = False
        self._tool_format = tool_calls.FORMATS["hermes"]
        self._output_layer = None  # set at load when prompts can be scored from hidden states
        self._arrivals: queue.SimpleQueue[_Admission | None] = queue.SimpleQueue()
        self._scheduler: threading.Thread | None = None
        self._closed = threading.Event()
        self._joinable = False  # whether prefilled rows can join a running batch's cache
        self._decoding: _Decoding | None = None
        self._cache_argument = "cache"
        self.prefill_chunk_tokens = GPU_PREFILL_CHUNK_TOKENS if device == "cuda" else PREFILL_CHUNK_TOKENS
        self._failures_in_a_row = 0
        self._broken: str | None = None  # why the engine can no longer serve
        self._iteration_started: float | None = None  # None while idle

    def load(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the model deployment was placed for a GPU but CUDA is unavailable")
        if self.device == "cpu":
            torch.set_num_threads(self.config.cpu_threads or os.cpu_count() or 1)
        location = self._model_location()
        self._tokenizer = load_tokenizer(location, self.config.trust_remote_code)
        self._read_chat_template()
        self._model = model = load_model(location, self.device, self._dtype, self.config.trust_remote_code)
        if self.config.adapters:  # before any forward pass: CUDA graphs capture the wrapped layers
            self._adapters = Adapters(
                model,
                {name: resolve_adapter_source(source) for name, source in self.config.adapters.items()},
                self.config.max_adapters,
            )
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either, so
        # an image that ships another 5.x still runs.
        self._cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._defaults = model_sampling_defaults(model.generation_config)
        self._eos_token_ids = self._collect_eos_token_ids()
        limits = [
            limit
            for limit in (self.config.context_length, getattr(model.config, "max_position_embeddings", None))
            if limit
        ]
        self._context_length = min(limits, default=_FALLBACK_CONTEXT_LENGTH)
        probe = self._probe()
        self._vocab_size = probe.logits.shape[-1]
        self._grammars = Grammars(self._tokenizer, self._vocab_size, self._eos_token_ids)
        self._output_layer = output_layer(model)
        self._joinable = kv_cache.can_join(probe[self._cache_argument])
        self._decoding = self._choose_decoding(probe)
        self._scheduler = threading.Thread(target=self._schedule_forever, name="textgen-scheduler", daemon=True)
        self._scheduler.start()
        logger.info(
            "loaded %s on %s (%s), context %d tokens, %d torch threads",
            self.config.source, self.device, self._dtype, self._context_length,
            torch.get_num_threads(),
        )

    def frontend_state(self) -> _FrontendState:
        return _FrontendState(
            context_length=self._context_length,
            defaults=self._defaults,
            vocab_size=self._vocab_size,
            eos_token_ids=self._eos_token_ids,
        )

    def load_frontend(self, state: object) -> None:
        assert isinstance(state, _FrontendState), state
        self._tokenizer = load_tokenizer(self._model_location(), self.config.trust_remote_code)
        self._read_chat_template()
        self._context_length, self._defaults = state.context_length, state.defaults
        self._grammars = Grammars(self._tokenizer, state.vocab_size, state.eos_token_ids)

    def _read_chat_template(self) -> None:
        """How tools reach this model: through its template, or the fallback; and the
        syntax its calls are read in (configured, or what the template teaches)."""
        template = self._tokenizer.chat_template if isinstance(self._tokenizer.chat_template, str) else None
        self._template_takes_tools = tool_calls.template_takes_tools(template)
        configured = self.config.tool_call_format
        self._tool_format = (
            tool_calls.format_for_template(template) if configured == "auto" else tool_calls.FORMATS[configured]
        )

    def _model_location(self) -> ModelLocation:
        if self.config.source == EMBEDDED_SOURCE:
            prepare_embedded_model()
        return resolve_model_source(self.config.source, self.config.revision)

    @torch.inference_mode()
    def _probe(self):
        """Runs one token through the model (which also warms its kernels up): its cache
        tells whether layers can be joined along the batch, and their geometry."""
        return self._model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=True)

    def _choose_decoding(self, probe) -> _Decoding:
        """The slot decoder where configured (``auto``: on a GPU) and the model's cache
        layers all keep full history; else the dynamic-cache path."""
        wanted = self.config.kv_cache
        if wanted == "auto":
            wanted = "slots" if self.device == "cuda" else "dynamic"
        if wanted == "slots" and not self._joinable:
            logger.warning("%s has cache layers that drop history (sliding windows): slots need "
                           "full history, so it decodes with the dynamic cache", self.config.source)
            wanted = "dynamic"
        if wanted == "dynamic":
            return _DynamicDecoding(self)
        keys = probe[self._cache_argument].layers[0].keys
        shape = SlotShape(len(probe[self._cache_argument].layers), keys.shape[1], keys.shape[3], keys.dtype)
        slots = self.config.max_batch_size
        slot_length = self._slot_length(shape, slots)
        if slot_length < self._context_length:
            logger.warning("KV cache holds %d tokens per sequence for %d sequences: requests are "
                           "capped there, below the model's context of %d",
                           slot_length, slots, self._context_length)
        self._context_length = slot_length
        decoder = SlotDecoder(
            self._model, self._cache_argument, shape, slots, slot_length,
            vocab_size=probe.logits.shape[-1], device=self.device, use_graphs=self.config.cuda_graphs,
            row_adapters=self._adapters.rows if self._adapters is not None else None,
        )
        logger.info("slot decoding: %d slots x %d tokens (%.1f GiB of KV cache), CUDA graphs %s",
                    slots, slot_length, shape.bytes_per_token() * slots * slot_length / 2**30,
                    "on" if decoder.uses_graphs else "off")
        return _SlotDecoding(self, decoder)

    def _slot_length(self, shape: SlotShape, slots: int) -> int:
        """Tokens per slot: the context, or on a GPU what ``gpu_memory_utilization`` of
        its memory leaves for the KV cache after the weights and a reserve for prefill
        (its DynamicCache of one admission wave, twice) and activations."""
        if self.device != "cuda":
            return self._context_length
        free, total = torch.cuda.mem_get_info()
        reserve = 2 * MAX_PREFILL_TOKENS * shape.bytes_per_token() + ACTIVATION_RESERVE_BYTES
        fits = tokens_per_slot(total, free, self.config.gpu_memory_utilization, reserve, shape, slots)
        if fits < MIN_SLOT_LENGTH:
            raise RuntimeError(
                f"the KV cache fits {max(fits, 0)} tokens per sequence for max_batch_size={slots} "
                f"in {self.config.gpu_memory_utilization:.0%} of the GPU's {total / 2**30:.0f} GiB "
                f"({(total - free) / 2**30:.1f} GiB already used); lower max_batch_size or raise "
                "gpu_memory_utilization"
            )
        return min(self._context_length, fits)

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
        self.check_health()  # a broken engine is not ready
        return ModelStatus(
            name=self.config.name,
            context_length=self._context_length,
            device=self.device,
            dtype=str(self._dtype).removeprefix("torch."),
        )

    def tokenize(self, params: TokenizeParams) -> list[int]:
        if not params.messages:
            return self._tokenizer(params.prompt, add_special_tokens=params.add_special_tokens)["input_ids"]
        if not self._tokenizer.chat_template:
            raise InvalidRequestError(
                f"model {self.config.name} has no chat template; send a plain prompt "
                "(/generate or /v1/completions) instead",
                param="messages",
            )
        turns, tools = tool_calls.render_messages(
            params.messages, params.tool_use, self._tool_format, self._template_takes_tools
        )
        rendered = self._tokenizer.apply_chat_template(
            turns,
            tools=tools,
            add_generation_prompt=params.add_generation_prompt,
            tokenize=False,
        )
        # A template writes its own special tokens; the tokenizer's (BOS) only when asked.
        return self._tokenizer(rendered, add_special_tokens=params.add_special_tokens)["input_ids"]

    def detokenize(self, tokens: Sequence[int]) -> str:
        self._check_token_ids(tokens, "tokens")
        return self._tokenizer.decode(list(tokens), skip_special_tokens=False)

    def _check_token_ids(self, tokens: Sequence[int], param: str, by_position: bool = False) -> None:
        """Raises InvalidRequestError naming the first id the tokenizer does not have
        (``param[i]`` with ``by_position``)."""
        size = len(self._tokenizer)
        at = next((at for at, token in enumerate(tokens) if not 0 <= token < size), None)
        if at is not None:
            where = f"{param}[{at}]" if by_position else param
            raise InvalidRequestError(
                f"{where}: {tokens[at]} is no token of {self.config.name} (ids are 0 to {size - 1})", param=where
            )

    def tokenizer_info(self) -> dict:
        return tokenizer_config(self._tokenizer, self._context_length)

    def prepare(self, params: GenerationParams) -> PreparedRequest:
        if params.prompt_token_ids is not None:
            token_ids = params.prompt_token_ids
            self._check_token_ids(token_ids, "prompt", by_position=True)
        else:
            token_ids = self.tokenize(
                TokenizeParams(
                    prompt=params.prompt, messages=params.messages, add_special_tokens=not params.messages,
                    tool_use=params.tool_use,
                )
            )
        prepared = prepare_request(params, token_ids, self._context_length, self._defaults)
        if prepared.adapter is not None and prepared.adapter not in self.config.adapters:
            known = ", ".join(self.config.adapters) or "none"
            raise InvalidRequestError(
                f"model {self.config.name} has no adapter {prepared.adapter!r}; its adapters: {known}", param="model"
            )
        self._check_token_ids(prepared.stop_token_ids, "stop_token_ids")
        if params.tool_use is not None and params.tool_use.calls_possible:
            prepared = self._with_tool_calls(prepared, params.tool_use)
        if prepared.constraint is not None:
            self._grammars.check(prepared.constraint)
        return prepared

    def _with_tool_calls(self, prepared: PreparedRequest, tool_use: ToolUse) -> PreparedRequest:
        """The request constrained to the answers ``tool_use`` allows, in the model's
        call syntax, read back by the replica. Each tool's parameters are compiled
        alone first, so that a schema that cannot be enforced is named."""
        for position, tool in enumerate(tool_use.tools):
            self._grammars.check(
                OutputConstraint("json_schema", tool.parameters, f"tools[{position}].function.parameters")
            )
        grammar = self._tool_format.grammar(tool_use, self._lark_literal)
        return dataclasses.replace(
            prepared,
            constraint=OutputConstraint("lark", grammar, "tools"),
            tool_format=self._tool_format.name,
            skip_special_tokens=False,  # a marker may be a special token
        )

    def _lark_literal(self, text: str) -> str:
        specials = {token: self._tokenizer.convert_tokens_to_ids(token)
                    for token in self._tokenizer.all_special_tokens if token and token in text}
        return tool_calls.lark_literal(text, specials)

    def _text_decoder(self, request: PreparedRequest) -> Callable[[Sequence[int]], str]:
        skip = request.skip_special_tokens
        return lambda token_ids: self._tokenizer.decode(token_ids, skip_special_tokens=skip)

    async def generate(self, request: PreparedRequest) -> AsyncIterator[list[SequenceDelta]]:
        outputs: asyncio.Queue = asyncio.Queue()
        outbox = _Outbox(asyncio.get_running_loop(), outputs, self.config.stream_interval_s)
        self._arrivals.put(_Admission(request, outbox))
        try:
            async for deltas in relay_steps(outputs, request.num_return_sequences):
                yield deltas
        finally:
            # Whether it finished or its reader left: the scheduler frees its rows.
            request.cancelled.set()

    def close(self) -> None:
        """Stops the scheduler after its current step; requests not finished fail."""
        if self._scheduler is not None:
            self._closed.set()
            self._arrivals.put(None)
            self._scheduler.join()

    def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError("model not loaded")
        if self._scheduler is None or not self._scheduler.is_alive():
            raise RuntimeError("the scheduler thread has stopped")
        if self._broken is not None:
            raise RuntimeError(f"engine broken: {self._broken}")
        started = self._iteration_started
        if started is not None and time.monotonic() - started > self.config.step_timeout_s:
            # Alive but stuck (a hung kernel, a deadlock): no request would ever finish.
            raise RuntimeError(
                f"engine stuck: a scheduler iteration has run for {time.monotonic() - started:.0f} s "
                f"(step_timeout_s is {self.config.step_timeout_s:g})"
            )

    # The scheduler thread.

    def _schedule_forever(self) -> None:
        waiting: deque[_Admission] = deque()
        decoding = self._decoding
        prefills: deque[_Prefill] = deque()  # the admitted wave, a group at a time
        while not self._closed.is_set():
            if not decoding.busy and not prefills and not waiting:
                self._iteration_started = None
                arrival = self._arrivals.get()  # idle: sleep until a request comes
                if arrival is None:  # close() woke the loop
                    continue
                waiting.append(arrival)
                self._collect_arrivals(waiting, wait_s=self.config.batch_wait_timeout_s)
            else:
                self._collect_arrivals(waiting, wait_s=0)
            self._iteration_started = time.monotonic()
            try:
                if not prefills:
                    prefills.extend(self._start_prefills(self._take_admissions(waiting, decoding)))
                if prefills:
                    prefilled = self._prefill_chunk(prefills[0], whole=not decoding.busy)
                    if prefills[0].finished:
                        if prefilled is not None:  # None: every row ended at its prompt
                            decoding.join(prefilled)
                        prefills.popleft()  # only now: a failed join fails its requests too
                decoding.step()
                self._failures_in_a_row = 0
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving others
                failed = self._admissions_in(decoding, prefills)
                logger.exception("decode step failed; failing its %d request(s)", len(failed))
                decoding.clear()
                prefills.clear()
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= BROKEN_AFTER_FAILURES and self._broken is None:
                    # One bad batch (a request too large for memory) is survivable; every
                    # step failing (a CUDA error, a corrupted state) is not. Set before
                    # the requests hear of it: the next health check must see it.
                    self._broken = f"{self._failures_in_a_row} decode steps in a row failed, the last with {exc!r}"
                    logger.error("engine broken: %s; the health check now fails", self._broken)
                for admission in failed:
                    admission.deliver(exc)
        closed = RuntimeError("the engine was closed")
        for admission in [*self._admissions_in(decoding, prefills), *waiting]:
            admission.deliver(closed)

    @staticmethod
    def _admissions_in(decoding: _Decoding, prefills: deque[_Prefill]) -> list[_Admission]:
        """The requests with rows being decoded or prompts in ``prefills``, each once."""
        found = {id(s.admission): s.admission for s in decoding.sequences() if not s.finished}
        found.update({id(a): a for prefill in prefills for a in prefill.admitted})
        return list(found.values())

    def _collect_arrivals(self, waiting: deque[_Admission], wait_s: float) -> None:
        """Moves new arrivals to ``waiting``; waits up to ``wait_s`` for more to come,
        so that requests sent together are prefilled together."""
        deadline = time.monotonic() + wait_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                arrival = self._arrivals.get(timeout=remaining) if remaining > 0 else self._arrivals.get_nowait()
            except queue.Empty:
                return
            if arrival is not None:  # None: close() woke the loop
                waiting.append(arrival)

    def _take_admissions(self, waiting: deque[_Admission], decoding: _Decoding) -> list[_Admission]:
        """The waiting requests that fit in the free rows now, first come first served;
        those whose caller left before they started are dropped on the way. A request
        whose adapter finds no slot (every slot holds one that running rows use) waits,
        and the requests behind it with it."""
        admitted: list[_Admission] = []
        free = decoding.free_rows()
        prefill_tokens = 0
        while waiting:
            request = waiting[0].request
            if request.cancelled.is_set():
                waiting.popleft().deliver(END_OF_STEPS)
                continue
            too_many = request.num_return_sequences > free
            too_long = admitted and prefill_tokens + len(request.prompt_token_ids) > MAX_PREFILL_TOKENS
            if too_many or too_long:
                break
            if request.adapter is not None:
                in_use = {s.admission.request.adapter for s in decoding.sequences() if not s.finished}
                slot = self._adapters.slot_for(request.adapter, in_use | {a.request.adapter for a in admitted})
                if slot is None:
                    break
                waiting[0].adapter_slot = slot
            admitted.append(waiting.popleft())
            free -= request.num_return_sequences
            prefill_tokens += len(request.prompt_token_ids)
        return admitted

    def _start_prefills(self, admitted: list[_Admission]) -> list[_Prefill]:
        started = time.monotonic()
        for admission in admitted:
            admission.request.timings.batch_started_at = started
        if not self._joinable:  # groups join the batch one after another: take the wave whole
            return [self._start_prefill(admitted)] if admitted else []
        # Requests that score their prompts are grouped apart: their groups keep every
        # position's logits (prompt_scores), which the others need not pay for.
        prefills = []
        for scoring in (False, True):
            wave = [admission for admission in admitted if (admission.request.prompt_logprobs is not None) == scoring]
            groups = prefill_groups([len(admission.request.prompt_token_ids) for admission in wave])
            prefills += [self._start_prefill([wave[index] for index in group]) for group in groups]
        return prefills

    def _start_prefill(self, admitted: list[_Admission]) -> _Prefill:
        prompts = [admission.request.prompt_token_ids for admission in admitted]
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        scores = None
        if any(admission.request.prompt_logprobs is not None for admission in admitted):
            scores = PromptScores(
                [admission.request.prompt_logprobs for admission in admitted], prompts, self._token_text
            )
        return _Prefill(admitted, input_ids, attention_mask, position_ids, scores=scores)

    @torch.inference_mode()
    def _prefill_chunk(self, prefill: _Prefill, whole: bool = False) -> _Prefilled | None:
        """Runs the next chunk of the prompts (``whole``: all that is left; a prefill
        that scores its prompts keeps to chunks of PromptScores.columns); once the
        last column has run, returns their rows (see `_prefilled`)."""
        rows, width = prefill.input_ids.shape
        columns = width - prefill.done
        if not whole:
            columns = min(columns, max(1, self.prefill_chunk_tokens // rows))
        scored_by_head = prefill.scores is not None and self._output_layer is not None
        if prefill.scores is not None and not scored_by_head:
            columns = min(columns, prefill.scores.columns(rows))  # whole logits: a bounded chunk
        end = prefill.done + columns
        self._use_adapters([admission.adapter_slot for admission in prefill.admitted])
        inputs = dict(
            input_ids=prefill.input_ids[:, prefill.done : end],
            attention_mask=prefill.attention_mask[:, :end],
            position_ids=prefill.position_ids[:, prefill.done : end],
            use_cache=True,
            **({self._cache_argument: prefill.cache} if prefill.cache is not None else {}),
        )
        if scored_by_head:  # the backbone's states, the head applied by the scorer in chunks
            output = self._model.get_decoder()(**inputs)
            states = output.last_hidden_state
            prefill.scores.add_chunk(states, prefill.input_ids, prefill.done, self._output_layer)
            last_logits = self._output_layer(states[:, -1, :])
        else:
            output = self._model(**inputs, logits_to_keep=0 if prefill.scores is not None else 1)
            if prefill.scores is not None:
                prefill.scores.add_chunk(output.logits, prefill.input_ids, prefill.done)
            last_logits = output.logits[:, -1, :]
        prefill.cache = output[self._cache_argument]  # the output field has the argument's name
        prefill.done = end
        if end < width:
            return None
        return self._prefilled(prefill, last_logits.float())

    def _prefilled(self, prefill: _Prefill, logits: torch.Tensor) -> _Prefilled | None:
        """The rows of a prefill whose last chunk has run, one per returned sequence,
        with their first next-token ``logits``. A request that scored its prompt gets
        the scores with its first delta; one that asked for no new token (echo with
        max_new_tokens 0) ends here: None when no row is left."""
        cache, admitted = prefill.cache, prefill.admitted
        sequences = []
        for row, admission in enumerate(admitted):
            request = admission.request
            scored = (prefill.scores.of_row(row) if prefill.scores is not None else None) or ()
            if request.max_new_tokens == 0:
                admission.deliver([
                    SequenceDelta(index, "", 0, "length", prompt_logprobs=scored if index == 0 else ())
                    for index in range(request.num_return_sequences)
                ])
                continue
            for index in range(request.num_return_sequences):
                sequence = _Sequence(admission, index, self._text_decoder(request), self._grammar_of(request))
                sequence.prompt_logprobs = scored if index == 0 else ()
                sequences.append(sequence)
        if not sequences:
            return None
        # Each prompt was run once; its cache and scores fan out to its sequences.
        owner = {id(admission): row for row, admission in enumerate(admitted)}
        rows = [owner[id(s.admission)] for s in sequences]
        fan_out = torch.tensor(rows, device=self.device)
        if rows != list(range(len(admitted))):
            cache.batch_select_indices(fan_out)
        return _Prefilled(
            sequences=sequences,
            sampling=[self._row_sampling(s.admission.request, s.index) for s in sequences],
            cache=cache,
            attention_mask=prefill.attention_mask[fan_out],
            last_position=prefill.position_ids[fan_out, -1],
            logits=logits[fan_out],
        )

    def _use_adapters(self, slots: Sequence[int]) -> None:
        """Tells the LoRA layers each row's adapter slot for the next forward pass (none
        when no row uses one: the base model's rows then cost nothing extra)."""
        if self._adapters is not None:
            self._adapters.rows.use(torch.tensor(slots, device=self.device) if any(slots) else None)

    def _grammar_of(self, request: PreparedRequest):
        return None if request.constraint is None else self._grammars.matcher(request.constraint)

    def allowed_tokens(self, sequences: Sequence[_Sequence]) -> torch.Tensor | None:
        """The rows' next-token bitmask (grammars.Grammars.bitmask), or None when no
        row is restricted. A row short of its min_tokens may not end: its EOS and stop
        token ids are cleared."""
        if not any(sequence.masked for sequence in sequences):
            return None
        mask = self._grammars.bitmask([sequence.grammar for sequence in sequences])
        for row, sequence in enumerate(sequences):
            if sequence.generated < sequence.min_tokens:
                ends = self._eos_token_ids | sequence.stop_token_ids
                if sequence.ignore_eos:
                    ends = sequence.stop_token_ids
                for token_id in ends:
                    bit = token_id % 32  # int32 words: bit 31 is the sign
                    mask[row, token_id // 32] &= ~(1 << bit) if bit < 31 else 0x7FFFFFFF
        return mask

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _logprobs(self, sequence: _Sequence, row: int, token_id: int, scores: RowScores | None) -> TokenLogprobs | None:
        if sequence.logprobs is None or scores is None:
            return None
        top = zip(scores.top_ids[row][: sequence.logprobs], scores.top[row][: sequence.logprobs], strict=True)
        return TokenLogprobs(
            TokenChoice(token_id, self._token_text(token_id), scores.chosen[row]),
            tuple(TokenChoice(other, self._token_text(other), logprob) for other, logprob in top),
        )

    @staticmethod
    def wants_scores(sequences: Sequence[_Sequence]) -> bool:
        """Whether a row asked for log probabilities."""
        return any(sequence.logprobs is not None for sequence in sequences)

    def _deliver(
        self, sequences: Sequence[_Sequence], token_ids: Sequence[int], scores: RowScores | None = None
    ) -> list[int]:
        """Hands each row's new token (and its log probabilities, when its request asked
        and ``scores`` has them) to its request; returns the rows still running.
        Rows already finished (a slot step decoded them once more before the host saw
        them end) are skipped; rows whose caller left end, their request told once."""
        per_request: dict[int, tuple[_Admission, list[SequenceDelta]]] = {}
        dropped: dict[int, _Admission] = {}
        still_running = []
        for row, (sequence, token_id) in enumerate(zip(sequences, token_ids, strict=True)):
            if sequence.finished:
                continue
            admission = sequence.admission
            if admission.request.cancelled.is_set():
                sequence.finished = True
                dropped[id(admission)] = admission
                continue
            delta = sequence.advance(token_id, self._eos_token_ids, self._logprobs(sequence, row, token_id, scores))
            per_request.setdefault(id(admission), (admission, []))[1].append(delta)
            if not sequence.finished:
                still_running.append(row)
        for admission in dropped.values():
            admission.deliver(END_OF_STEPS)
        for admission, deltas in per_request.values():
            admission.deliver(deltas)
        return still_running

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> _Batch | None:
        """Samples every row's next token, delivers it, drops the rows that ended or whose
        caller left, and runs the forward pass for the rest. Returns None when no row is
        left. Rows leave in one `keep` (each one copies the KV cache)."""
        logits = batch.logits
        allowed = self.allowed_tokens(batch.sequences)
        if allowed is not None:
            logits = mask_disallowed(logits, allowed.to(logits.device))
        next_tokens = batch.sampler.sample(logits)  # cancelled rows too: cheaper than a keep
        batch.sampler.observe(next_tokens)
        scores = None
        if self.wants_scores(batch.sequences):
            chosen, top, top_ids = score_rows(batch.logits, next_tokens, MAX_TOP_LOGPROBS)
            scores = RowScores(chosen.tolist(), top_ids.tolist(), top.tolist())
        still_running = self._deliver(batch.sequences, next_tokens.tolist(), scores)
        if not still_running:
            return None
        batch.keep(still_running)
        next_tokens = next_tokens[torch.tensor(still_running, device=next_tokens.device)]
        batch.attention_mask = torch.cat(
            [batch.attention_mask, batch.attention_mask.new_ones(len(still_running), 1)], dim=1
        )
        batch.last_position = batch.last_position + 1
        metrics.record_batch_size(self.config.name, len(still_running))
        self._use_adapters([sequence.admission.adapter_slot for sequence in batch.sequences])
        output = self._model(
            input_ids=next_tokens[:, None],
            attention_mask=batch.attention_mask,
            position_ids=batch.last_position[:, None],
            use_cache=True,
            **{self._cache_argument: batch.cache},
        )
        batch.logits = output.logits[:, -1, :].float()
        return batch

    @staticmethod
    def _row_sampling(request: PreparedRequest, index: int) -> RowSampling:
        seed = None if request.seed is None else sequence_seed(request.seed, index)
        return RowSampling(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            seed=seed,
        )


class _Decoding(abc.ABC):
    """How the scheduler decodes its running rows: `_DynamicDecoding` or `_SlotDecoding`."""

    @property
    @abc.abstractmethod
    def busy(self) -> bool:
        """Rows running, or tokens not yet handed over."""

    @abc.abstractmethod
    def free_rows(self) -> int:
        """Rows that newly prefilled sequences may take now."""

    @abc.abstractmethod
    def join(self, prefilled: _Prefilled) -> None:
        """Takes newly prefilled rows into the running batch."""

    @abc.abstractmethod
    def step(self) -> None:
        """One decode step of the running rows, if any; hands tokens over."""

    @abc.abstractmethod
    def sequences(self) -> list[_Sequence]:
        """Every sequence still owed tokens (to fail them when a step fails)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Forgets every row (after a failed step)."""


class _DynamicDecoding(_Decoding):
    """transformers' DynamicCache, rows left-padded to a shared last column, eager steps:
    the CPU's path (slots, eager there, gave 0.95 of its tokens/s at 1 client and 0.92 at
    16 on 2 EPYC cores: bench/results/kv_cache_cpu.json)."""

    def __init__(self, engine: TransformersEngine) -> None:
        self._engine = engine
        self._batch: _Batch | None = None

    @property
    def busy(self) -> bool:
        return self._batch is not None

    def free_rows(self) -> int:
        if self._batch is None:
            return self._engine.config.max_batch_size
        if not self._engine._joinable:
            return 0  # static batching for caches that cannot be joined
        return self._engine.config.max_batch_size - len(self._batch.sequences)

    def join(self, prefilled: _Prefilled) -> None:
        joining = _Batch.of(prefilled, self._engine._joinable)
        if self._batch is None:
            self._batch = joining
        else:
            self._batch.join(joining)

    def step(self) -> None:
        if self._batch is not None:
            self._batch = self._engine._step(self._batch)

    def sequences(self) -> list[_Sequence]:
        return self._batch.sequences if self._batch else []

    def clear(self) -> None:
        self._batch = None


class _SlotDecoding(_Decoding):
    """The slot decoder (CUDA graphs on a GPU), one step ahead of the host: each step is
    launched before the tokens of the previous one are handed over, so the host's work
    overlaps the GPU's. A row that ends is decoded once more before the host sees it
    end; that token is dropped."""

    def __init__(self, engine: TransformersEngine, decoder: SlotDecoder) -> None:
        self._engine, self.decoder = engine, decoder
        self._in_flight: deque[Tokens] = deque()

    @property
    def busy(self) -> bool:
        return bool(self.decoder.rows or self._in_flight)

    def free_rows(self) -> int:
        return self.decoder.free_slots

    @torch.inference_mode()
    def join(self, prefilled: _Prefilled) -> None:
        self._in_flight.append(
            self.decoder.join(
                prefilled.sequences, prefilled.sampling, prefilled.prompts,
                prefilled.cache, prefilled.attention_mask, prefilled.logits,
                allowed=self._engine.allowed_tokens(prefilled.sequences),
                scored=self._engine.wants_scores(prefilled.sequences),
                adapter_slots=[sequence.admission.adapter_slot for sequence in prefilled.sequences],
            )
        )

    @torch.inference_mode()
    def step(self) -> None:
        # A constrained row's mask needs its last token (a min_tokens row, its count), so
        # while one runs the host does not work a step behind: every step in flight is
        # handed over first.
        constrained = any(sequence.masked for sequence in self.decoder.rows)
        if constrained:
            self._hand_over(keep=0)
        launched = bool(self.decoder.rows)
        if launched:
            metrics.record_batch_size(self._engine.config.name, len(self.decoder.rows))
            allowed = self._engine.allowed_tokens(self.decoder.rows) if constrained else None
            self._in_flight.append(self.decoder.step(allowed, scored=self._engine.wants_scores(self.decoder.rows)))
        self._hand_over(keep=1 if launched else 0)

    def _hand_over(self, keep: int) -> None:
        """Hands over the tokens of the steps in flight but the last ``keep``, and frees
        the slots of the rows that ended."""
        while len(self._in_flight) > keep:
            tokens = self._in_flight.popleft()
            self._engine._deliver(tokens.rows, tokens.token_ids(), tokens.scores)
            self.decoder.remove([row for row, sequence in enumerate(self.decoder.rows) if sequence.finished])

    def sequences(self) -> list[_Sequence]:
        return [*self.decoder.rows, *(sequence for tokens in self._in_flight for sequence in tokens.rows)]

    def clear(self) -> None:
        self.decoder.clear()
        self._in_flight.clear()
