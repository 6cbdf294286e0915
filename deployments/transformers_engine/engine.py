"""The HuggingFace transformers engine: loads a causal LM, prepares requests for it and
hands them to its scheduler thread (`scheduler.py`), which batches them continuously and
decodes with the dynamic cache (`dynamic_decoding.py`) or with slots
(`slot_decoding.py`)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence

import torch
from transformers import GenerationConfig

from deployments import tool_calls
from deployments.config import EMBEDDED_SOURCE, ModelConfig
from deployments.engine import (
    SERVICE_DEFAULTS,
    Engine,
    PreparedRequest,
    SamplingDefaults,
    prepare_request,
    relay_steps,
)
from deployments.model_source import ModelLocation, resolve_adapter_source, resolve_model_source
from deployments.protocol import (
    GenerationParams,
    InvalidRequestError,
    ModelStatus,
    OutputConstraint,
    SequenceDelta,
    TokenizeParams,
    ToolUse,
)
from deployments.transformers_engine import kv_cache
from deployments.transformers_engine.decoding import Decoding, LoadedModel
from deployments.transformers_engine.dynamic_decoding import DynamicDecoding
from deployments.transformers_engine.grammars import Grammars
from deployments.transformers_engine.lora import Adapters
from deployments.transformers_engine.prefix_cache import PrefixCache
from deployments.transformers_engine.prompt_scores import output_layer
from deployments.transformers_engine.loading import (
    load_model,
    load_tokenizer,
    tokenizer_config,
    prepare_embedded_model,
    resolve_dtype,
)
from deployments.transformers_engine.rows import Admission, Delivery
from deployments.transformers_engine.scheduler import MAX_PREFILL_TOKENS, Outbox, Scheduler
from deployments.transformers_engine.slot_decoder import SlotDecoder, SlotShape, tokens_per_slot
from deployments.transformers_engine.slot_decoding import SlotDecoding

logger = logging.getLogger("ray.serve")

_FALLBACK_CONTEXT_LENGTH = 2048
# GPU memory kept out of the slot KV cache for activations, logits and CUDA graphs.
ACTIVATION_RESERVE_BYTES = 2 << 30
# Fewest tokens per slot worth serving with.
MIN_SLOT_LENGTH = 64
# The dynamic cache's default bound on rows x longest row, per max_batch_size row (see
# ModelConfig.max_padded_tokens): 16 rows of 1,024 tokens, 0.75 GB of SmolLM2-135M's KV
# in float32.
PADDED_TOKENS_PER_ROW = 1024
# The prefix cache's default budget: on a CPU, 1 GiB (22k tokens of SmolLM2-135M in
# float32); on a GPU, this share of what the KV cache may take.
CPU_PREFIX_CACHE_BYTES = 1 << 30
GPU_PREFIX_CACHE_SHARE = 0.1


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


@dataclasses.dataclass(frozen=True)
class _FrontendState:
    """What a replica-side copy of the engine needs to prepare requests as the model's
    own process does (TransformersEngine.frontend_state)."""

    context_length: int
    defaults: SamplingDefaults
    vocab_size: int  # the logits' width
    eos_token_ids: frozenset[int]



class TransformersEngine(Engine):
    """Runs a HuggingFace causal LM with its own continuous-batching decode loop.

    The loop runs on the scheduler thread (`Scheduler`), never on the replica's event
    loop; this facade loads the model, tokenizes and checks requests, and relays each
    request's steps from the scheduler to its caller.
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
        self._context_length = _FALLBACK_CONTEXT_LENGTH
        self._dtype = resolve_dtype(config.dtype, device)
        self._template_takes_tools = False
        self._tool_format = tool_calls.FORMATS["hermes"]
        self._delivery: Delivery | None = None
        self._decoding: Decoding | None = None
        self._scheduler: Scheduler | None = None
        self._prefix_cache: PrefixCache | None = None

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
        cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        loaded = LoadedModel(model, self.config.name, self.device, cache_argument, self._adapters, output_layer(model))
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
        self._delivery = Delivery(self._tokenizer, self._eos_token_ids, self._grammars)
        joinable = kv_cache.can_join(loaded.cache_of(probe))
        # Sliding-window layers drop history: their prefixes cannot be kept.
        prefix_bytes = self._prefix_cache_bytes() if joinable else 0
        self._prefix_cache = PrefixCache(prefix_bytes) if prefix_bytes else None
        self._decoding = self._choose_decoding(loaded, probe, joinable, prefix_bytes)
        self._scheduler = Scheduler(
            loaded, self._delivery, self._decoding, joinable,
            slot_for=self._adapters.slot_for if self._adapters is not None else None,
            batch_wait_timeout_s=self.config.batch_wait_timeout_s,
            prefix_cache=self._prefix_cache,
            fair=self.config.scheduling_policy == "fair",
            max_rows_per_tenant=self.config.max_rows_per_tenant,
        )
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

    def _prefix_cache_bytes(self) -> int:
        """The prefix cache's budget: configured, or 1 GiB on a CPU, or on a GPU a tenth
        of what ``gpu_memory_utilization`` leaves after the weights and the reserve."""
        if self.config.prefix_cache_mb is not None:
            return self.config.prefix_cache_mb << 20
        if self.device != "cuda":
            return CPU_PREFIX_CACHE_BYTES
        free, total = torch.cuda.mem_get_info()
        budget = total * self.config.gpu_memory_utilization - (total - free) - ACTIVATION_RESERVE_BYTES
        return max(0, int(budget * GPU_PREFIX_CACHE_SHARE))

    def _choose_decoding(self, model: LoadedModel, probe, joinable: bool, prefix_bytes: int) -> Decoding:
        """The slot decoder where configured (``auto``: on a GPU) and the model's cache
        layers all keep full history; else the dynamic-cache path."""
        wanted = self.config.kv_cache
        if wanted == "auto":
            wanted = "slots" if self.device == "cuda" else "dynamic"
        if wanted == "slots" and not joinable:
            logger.warning("%s has cache layers that drop history (sliding windows): slots need "
                           "full history, so it decodes with the dynamic cache", self.config.source)
            wanted = "dynamic"
        if wanted == "dynamic":
            padded = self.config.max_padded_tokens or self.config.max_batch_size * PADDED_TOKENS_PER_ROW
            return DynamicDecoding(model, self._delivery, self.config.max_batch_size, joinable, self._prefix_cache, padded)
        layers = model.cache_of(probe).layers
        shape = SlotShape(len(layers), layers[0].keys.shape[1], layers[0].keys.shape[3], layers[0].keys.dtype)
        slots = self.config.max_batch_size
        slot_length = self._slot_length(shape, slots, prefix_bytes)
        if slot_length < self._context_length:
            logger.warning("KV cache holds %d tokens per sequence for %d sequences: requests are "
                           "capped there, below the model's context of %d",
                           slot_length, slots, self._context_length)
        self._context_length = slot_length
        decoder = SlotDecoder(
            model.model, model.cache_argument, shape, slots, slot_length,
            vocab_size=probe.logits.shape[-1], device=self.device, use_graphs=self.config.cuda_graphs,
            row_adapters=self._adapters.rows if self._adapters is not None else None,
        )
        logger.info("slot decoding: %d slots x %d tokens (%.1f GiB of KV cache), CUDA graphs %s",
                    slots, slot_length, shape.bytes_per_token() * slots * slot_length / 2**30,
                    "on" if decoder.uses_graphs else "off")
        return SlotDecoding(model, self._delivery, decoder, self._prefix_cache)

    def _slot_length(self, shape: SlotShape, slots: int, prefix_bytes: int) -> int:
        """Tokens per slot: the context, or on a GPU what ``gpu_memory_utilization`` of
        its memory leaves for the KV cache after the weights, the prefix cache and a
        reserve for prefill (its DynamicCache of one admission wave, twice) and
        activations."""
        if self.device != "cuda":
            return self._context_length
        free, total = torch.cuda.mem_get_info()
        reserve = 2 * MAX_PREFILL_TOKENS * shape.bytes_per_token() + ACTIVATION_RESERVE_BYTES + prefix_bytes
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
        if prepared.num_return_sequences > self.config.max_batch_size:  # else it would wait for ever
            raise InvalidRequestError(
                f"{prepared.num_return_sequences} sequences (n) is more than model {self.config.name}'s "
                f"max_batch_size of {self.config.max_batch_size}: a request's sequences run together",
                param="num_return_sequences",
            )
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

    async def generate(self, request: PreparedRequest) -> AsyncIterator[list[SequenceDelta]]:
        if request.constraint is not None:
            # Compiled here, off the scheduler thread, before the request queues: in the
            # engine process (whose cache `prepare` never filled) a large schema took
            # 0.28 s to compile there, stalling every running row. The row then takes a
            # copy of the compiled template.
            await asyncio.to_thread(self._grammars.check, request.constraint)
        outputs: asyncio.Queue = asyncio.Queue()
        outbox = Outbox(asyncio.get_running_loop(), outputs, self.config.stream_interval_s)
        self._scheduler.submit(Admission(request, outbox.deliver))
        try:
            async for deltas in relay_steps(outputs, request.num_return_sequences):
                yield deltas
        finally:
            # Whether it finished or its reader left: the scheduler frees its rows.
            request.cancelled.set()

    def close(self) -> None:
        """Stops the scheduler after its current step; requests not finished fail."""
        if self._scheduler is not None:
            self._scheduler.close()

    def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError("model not loaded")
        if self._scheduler is None or not self._scheduler.alive:
            raise RuntimeError("the scheduler thread has stopped")
        if self._scheduler.broken is not None:
            raise RuntimeError(f"engine broken: {self._scheduler.broken}")
        started = self._scheduler.iteration_started
        if started is not None and time.monotonic() - started > self.config.step_timeout_s:
            # Alive but stuck (a hung kernel, a deadlock): no request would ever finish.
            raise RuntimeError(
                f"engine stuck: a scheduler iteration has run for {time.monotonic() - started:.0f} s "
                f"(step_timeout_s is {self.config.step_timeout_s:g})"
            )

