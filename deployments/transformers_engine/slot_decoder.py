"""Decoding from a preallocated KV cache with a slot per running sequence, replayed as
CUDA graphs on a GPU.

Why: an eager decode step of a transformers model issues hundreds of small kernels from
Python; on an H200 each step took 50-60 ms whatever the batch (the host set the pace),
so our engine reached 0.06-0.26 of transformers' compiled static-cache `generate`.
A CUDA graph replays the whole step (forward pass, sampling, bookkeeping) as one launch.
A graph needs tensors that never move or change shape, hence:

- one KV tensor ``kv[layers, 2, slots, kv_heads, slot_length, head_dim]``, allocated once;
  running rows are slots 0..n-1 (a row that leaves is replaced by the last row, so rows
  stay packed) and row i keeps the token at position p in ``kv[:, :, i, :, p]``, so rows
  of any length decode together with per-row positions and no padding on the left;
- graphs captured per (rows bucket, columns bucket): a step of n rows whose longest row
  has p tokens replays the graph of the smallest buckets holding them (padding rows are
  free slots, whose results are ignored), and attention reads only that many columns;
- sampling inside the graph (`sampling.sample_rows`), with every parameter a per-slot
  tensor, so no host synchronisation per step; the sampled tokens are fed back on the
  device and copied to the host asynchronously (`Tokens`), so that the host's work on
  step t (detokenising, stop strings, streaming) overlaps the GPU's step t+1.

Prefill stays eager and chunked (the scheduler's `_prefill_chunk`, transformers'
DynamicCache); a prefilled row's history is then copied into its slot (`join`).
On a CPU the same decoder runs eagerly, without graphs: that is how its tokens are
tested against the dynamic-cache path on CI, which has no GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Sequence

import torch

from deployments.transformers_engine.grammars import bitmask_words, mask_disallowed
from deployments.protocol import MAX_TOP_LOGPROBS
from deployments.transformers_engine.sampling import RowSampling, RowScores, sample_rows, score_rows

logger = logging.getLogger("ray.serve")

# Column buckets start here; a step's attention reads at most twice the columns it needs.
SMALLEST_COLUMN_BUCKET = 128


def row_buckets(slots: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, then every multiple of 8, and
    ``slots`` itself (as vLLM captures), so a step pads at most 7 rows past 8."""
    buckets = [size for size in (1, 2, 4) if size < slots]
    buckets += list(range(8, slots, 8))
    return [*buckets, slots]


def column_buckets(slot_length: int) -> list[int]:
    """Attention widths a graph is captured for: powers of two from 128, and the slot
    length itself."""
    buckets, width = [], SMALLEST_COLUMN_BUCKET
    while width < slot_length:
        buckets.append(width)
        width *= 2
    return [*buckets, slot_length]


def _smallest_at_least(buckets: Sequence[int], size: int) -> int:
    return next(bucket for bucket in buckets if bucket >= size)


@dataclasses.dataclass(frozen=True)
class SlotShape:
    """The model's cache geometry, read from a cache it filled (one prefilled token)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


def tokens_per_slot(total: int, free: int, utilization: float, reserve: int, shape: SlotShape, slots: int) -> int:
    """Tokens each of ``slots`` slots can hold when the process may fill ``utilization``
    of the device's ``total`` bytes, of which ``total - free`` are in use already (weights,
    other processes) and ``reserve`` is kept for activations."""
    budget = total * utilization - (total - free) - reserve
    return int(budget // (shape.bytes_per_token() * slots))


class _SlotCache:
    """What the model's attention layers get as their cache in a decode step: each row's
    new key and value are written at the row's own position, and the rows' first
    ``columns`` columns come back to attend over (the mask hides those past each row)."""

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.rows = 0
        self.columns = 0
        self.row_index: torch.Tensor | None = None  # arange(rows)
        self.write_positions: torch.Tensor | None = None  # [rows]

    def get_seq_length(self, *args, **kwargs) -> int:
        """Asked by older transformers (5.1x) only to number positions and masks,
        both of which the decoder passes explicitly."""
        return 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.kv[layer_idx, 0], self.kv[layer_idx, 1]
        keys[self.row_index, :, self.write_positions] = key_states[:, :, 0]
        values[self.row_index, :, self.write_positions] = value_states[:, :, 0]
        return keys[: self.rows, :, : self.columns], values[: self.rows, :, : self.columns]


class Tokens:
    """The tokens one step (or a join) chose, on their way to the host, with the rows
    they belong to as the step saw them (rows may be reordered before they arrive);
    ``scores`` are their log probabilities when the step computed them."""

    def __init__(
        self, rows: list, device_tokens: torch.Tensor, host_buffer: torch.Tensor,
        device_scores: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.rows = rows
        self._host = host_buffer[: len(rows)]
        self._host.copy_(device_tokens[: len(rows)], non_blocking=True)
        self._ready = None
        if device_tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()
        self.scores: RowScores | None = None
        if device_scores is not None:
            # Copied now, before the next step overwrites them: a step whose rows want
            # log probabilities waits for the device (the host no longer works ahead).
            chosen, top, top_ids = (tensor[: len(rows)].tolist() for tensor in device_scores)
            self.scores = RowScores(chosen, top_ids, top)

    def token_ids(self) -> list[int]:
        """Waits for the copy (not for later steps) and returns one token per row."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


class SlotDecoder:
    """Runs the decode steps of up to ``slots`` rows, each with up to ``slot_length``
    tokens (prompt and generated), over the model's own forward pass.

    Args:
        model: a transformers causal LM whose cache layers all keep full history.
        cache_argument: the name of the forward pass's cache argument.
        shape: the model's cache geometry.
        slots: most rows decoded together.
        slot_length: most tokens per row.
        vocab_size: width of the logits.
        device: where the model runs.
        use_graphs: replay decode steps as CUDA graphs (CUDA only).
        row_adapters: where the model's LoRA layers read each row's adapter slot, if
            it has adapters (lora.py).
    """

    def __init__(
        self,
        model,
        cache_argument: str,
        shape: SlotShape,
        slots: int,
        slot_length: int,
        vocab_size: int,
        device: str,
        use_graphs: bool,
        row_adapters=None,
    ) -> None:
        self._model, self._cache_argument = model, cache_argument
        self._row_adapters = row_adapters
        self.slots, self.slot_length = slots, slot_length
        self._use_graphs = use_graphs and device == "cuda"
        # Steps take the shapes of the buckets (padding rows, wider attention) whenever
        # graphs are on; tests set it on a CPU to check those shapes' tokens eagerly.
        self.bucketed = self._use_graphs
        self._row_buckets, self._column_buckets = row_buckets(slots), column_buckets(slot_length)

        def zeros(*size, dtype=torch.long):
            return torch.zeros(*size, dtype=dtype, device=device)

        self._cache = _SlotCache(zeros(shape.layers, 2, slots, shape.kv_heads, slot_length, shape.head_dim, dtype=shape.dtype))
        self._row_index = torch.arange(slots, device=device)
        self._column_index = torch.arange(slot_length, device=device)
        # Per-slot state a step reads and advances (static, so graphs can capture it).
        self._input_ids = zeros(slots, 1)  # the token each row feeds next
        self._positions = zeros(slots)  # that token's position
        self._counters = zeros(slots)  # tokens each row has drawn (its sampling counter)
        self._seeds = zeros(slots)
        self._temperature = zeros(slots, dtype=torch.float32)
        self._top_p = zeros(slots, dtype=torch.float32)
        self._top_k = zeros(slots)
        self._penalty = zeros(slots, dtype=torch.float32)
        self._seen = zeros(slots, vocab_size, dtype=torch.bool)
        self._presence = zeros(slots, dtype=torch.float32)
        self._frequency = zeros(slots, dtype=torch.float32)
        # Times each row generated each token; int16 holds the most new tokens (4096).
        self._counts = zeros(slots, vocab_size, dtype=torch.int16)
        # Each row's allowed next tokens (grammars.py), written by the host before a
        # step that has a constrained row; -1 (every token) for the other rows.
        self._allowed = zeros(slots, bitmask_words(vocab_size), dtype=torch.int32)
        self._adapter_slots = zeros(slots)  # each row's LoRA adapter slot (0: none)
        self._chosen = zeros(slots)  # the tokens a step chose, read by `Tokens`
        # Their log probabilities and the likeliest tokens', when a row asks for them.
        self._chosen_logprob = zeros(slots, dtype=torch.float32)
        self._top_logprobs = zeros(slots, min(MAX_TOP_LOGPROBS, vocab_size), dtype=torch.float32)
        self._top_ids = zeros(slots, min(MAX_TOP_LOGPROBS, vocab_size))
        self._host_tokens = [
            torch.zeros(slots, dtype=torch.long, pin_memory=device == "cuda") for _ in range(4)
        ]
        self._next_host = 0
        # Host copies: what each row is, where it is, and whether it samples.
        self.rows: list = []
        self._lengths: list[int] = []  # per row, its fed token's position + 1
        self._samples: list[bool] = []
        self._graphs: dict[tuple[int, int, bool, bool, bool], torch.cuda.CUDAGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self._use_graphs else None

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.rows)

    @property
    def uses_graphs(self) -> bool:
        return self._use_graphs

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)

    def _host_buffer(self) -> torch.Tensor:
        # Four in rotation: at most two are in flight (the step running and the one
        # whose tokens the host is reading).
        self._next_host = (self._next_host + 1) % len(self._host_tokens)
        return self._host_tokens[self._next_host]

    def join(
        self,
        rows: list,
        sampling: Sequence[RowSampling],
        prompts: Sequence[Sequence[int]],
        cache,
        attention_mask: torch.Tensor,
        logits: torch.Tensor,
        allowed: torch.Tensor | None = None,
        scored: bool = False,
        adapter_slots: Sequence[int] | None = None,
    ) -> Tokens:
        """Takes newly prefilled rows into free slots and chooses their first tokens.

        Args:
            rows: what the caller tracks per row (returned with every step's tokens).
            sampling: each row's parameters (seeds already resolved per sequence).
            prompts: each row's prompt tokens (seen by the repetition penalty).
            cache: the rows' prefilled DynamicCache, left-padded (history ends at the
                last column).
            attention_mask: [rows, columns], 1 on each row's prompt tokens.
            logits: [rows, vocab] float32 scores of each row's first new token.
            allowed: the rows' bitmask of allowed first tokens, if any is constrained.
            scored: whether a row asks for log probabilities.
            adapter_slots: each row's LoRA adapter slot (none: 0).
        """
        first, count = len(self.rows), len(rows)
        assert count <= self.free_slots, (count, self.free_slots)
        device = logits.device
        lengths = [len(prompt) for prompt in prompts]
        # Row r's prompt is in its unmasked columns (a cached prefix and the rest may have
        # masked columns between them); it moves to positions 0.. of its slot.
        source_rows, source_columns = attention_mask.nonzero(as_tuple=True)
        target_slots = source_rows + first
        target_positions = (attention_mask.cumsum(-1) - 1)[source_rows, source_columns]
        for layer, cached in enumerate(cache.layers):
            for kind, history in enumerate((cached.keys, cached.values)):
                self._cache.kv[layer, kind][target_slots, :, target_positions] = history[source_rows, :, source_columns]
        joined = slice(first, first + count)

        def put(target: torch.Tensor, values: list) -> None:
            target[joined] = torch.tensor(values, dtype=target.dtype).to(device)

        put(self._positions, lengths)
        put(self._counters, [0] * count)
        put(self._adapter_slots, list(adapter_slots) if adapter_slots is not None else [0] * count)
        put(self._seeds, [secrets.randbits(63) if r.seed is None else r.seed for r in sampling])
        put(self._temperature, [r.temperature for r in sampling])
        put(self._top_p, [r.top_p for r in sampling])
        put(self._top_k, [r.top_k for r in sampling])
        put(self._penalty, [r.repetition_penalty for r in sampling])
        put(self._presence, [r.presence_penalty for r in sampling])
        put(self._frequency, [r.frequency_penalty for r in sampling])
        self._counts[joined] = 0
        self._seen[joined] = False
        prompt_rows = torch.cat([torch.full((length,), row, device=device) for row, length in enumerate(lengths)])
        prompt_ids = torch.tensor([token for prompt in prompts for token in prompt], device=device)
        self._seen[first + prompt_rows, prompt_ids] = True
        samples = [
            r.temperature > 0 or r.repetition_penalty != 1.0 or r.presence_penalty != 0 or r.frequency_penalty != 0
            for r in sampling
        ]
        if allowed is not None:
            self._allowed[joined] = allowed.to(device)
        self._choose(logits, joined, sampled=any(samples), constrained=allowed is not None, scored=scored)
        self.rows += rows
        self._lengths += [length + 1 for length in lengths]
        self._samples += samples
        return Tokens(rows, self._chosen[joined], self._host_buffer(), self._scores(joined) if scored else None)

    def _scores(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._chosen_logprob[rows], self._top_logprobs[rows], self._top_ids[rows]

    def _choose(self, logits: torch.Tensor, rows: slice, sampled: bool, constrained: bool, scored: bool) -> None:
        """Samples the next token of ``rows`` from their ``logits`` (masked by their
        allowed tokens when ``constrained``) and advances them: the token becomes the
        rows' next input, one position and one draw further. ``scored``: also the log
        probabilities of the raw logits (`sampling.score_rows`)."""
        raw = logits
        if constrained:
            logits = mask_disallowed(logits, self._allowed[rows])
        chosen = sample_rows(
            logits,
            self._temperature[rows],
            self._top_p[rows],
            self._top_k[rows],
            self._penalty[rows],
            self._seen[rows],
            self._presence[rows],
            self._frequency[rows],
            self._counts[rows],
            self._seeds[rows],
            self._counters[rows],
            sampled,
        )
        self._chosen[rows] = chosen
        if scored:
            self._chosen_logprob[rows], self._top_logprobs[rows], self._top_ids[rows] = score_rows(
                raw, chosen, self._top_ids.shape[1]
            )
        self._input_ids[rows, 0] = chosen
        self._counters[rows] += 1
        self._seen[rows].scatter_(1, chosen[:, None], True)
        self._counts[rows].scatter_add_(1, chosen[:, None], torch.ones_like(chosen[:, None], dtype=self._counts.dtype))

    def step(self, allowed: torch.Tensor | None = None, scored: bool = False) -> Tokens:
        """Launches one decode step of every row (rows must be non-empty), restricted to
        ``allowed`` (the rows' bitmask) if given, with log probabilities if ``scored``;
        returns its tokens, still on their way to the host."""
        count = len(self.rows)
        # A row that ended in the step before this one may be one past its slot.
        longest = min(max(self._lengths), self.slot_length)
        sampled = any(self._samples)
        constrained = allowed is not None
        if constrained:
            self._allowed[:count] = allowed.to(self._allowed.device)
            self._allowed[count:] = -1  # padding rows of a bucket: any token
        if not self.bucketed:
            self._decode(count, longest, sampled, constrained, scored)
        else:
            key = (
                _smallest_at_least(self._row_buckets, count),
                _smallest_at_least(self._column_buckets, longest),
                sampled,
                constrained,
                scored,
            )
            graph = self._graphs.get(key)
            if graph is None and self._use_graphs:
                graph = self._capture(key)
            if graph is not None:
                graph.replay()
            else:
                self._decode(*key)
        self._lengths = [length + 1 for length in self._lengths]
        return Tokens(list(self.rows), self._chosen, self._host_buffer(), self._scores(slice(0, count)) if scored else None)

    def _decode(self, rows: int, columns: int, sampled: bool, constrained: bool, scored: bool) -> None:
        """One decode step of the first ``rows`` slots attending over ``columns`` columns."""
        positions = self._positions[:rows]
        cache = self._cache
        cache.rows, cache.columns = rows, columns
        cache.row_index = self._row_index[:rows]
        # Padding rows (free slots) and rows that already ended, decoded once more
        # before the host saw it, may be past the end: they write into the last column.
        cache.write_positions = positions.clamp(max=self.slot_length - 1)
        if self._row_adapters is not None:  # from a static tensor: graphs replay it
            self._row_adapters.use(self._adapter_slots[:rows])
        visible = self._column_index[None, :columns] <= positions[:, None]
        output = self._model(
            input_ids=self._input_ids[:rows],
            position_ids=positions[:, None],
            attention_mask=visible[:, None, None, :],
            use_cache=True,
            **{self._cache_argument: cache},
        )
        self._positions[:rows] += 1
        self._choose(output.logits[:, -1, :].float(), slice(0, rows), sampled, constrained, scored)

    def _capture(self, key: tuple[int, int, bool, bool, bool]) -> torch.cuda.CUDAGraph | None:
        """Captures the graph of a step shape on first use. The warm-up run before it
        changes the rows' state, so that state is saved and put back (the keys and
        values it writes are the ones the real step writes again). A shape that cannot
        be captured runs eagerly from then on, and says so once."""
        rows = key[0]
        state = [self._input_ids, self._positions, self._counters, self._seen, self._counts, self._chosen]
        saved = [tensor[:rows].clone() for tensor in state]

        def restore() -> None:
            for tensor, copy in zip(state, saved, strict=True):
                tensor[:rows] = copy

        try:
            self._decode(*key)  # warm-up: kernels pick their algorithms outside capture
            restore()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._decode(*key)
        except Exception:  # noqa: BLE001 - decode eagerly, slower but correct
            logger.exception("could not capture the decode step %s as a CUDA graph; it runs eagerly", key)
            self._use_graphs = False
            restore()
            return None
        self._graphs[key] = graph
        logger.info("captured decode graph for %d rows x %d columns (sampling: %s, constrained: %s, scored: %s)", *key)
        return graph

    def history(self, row: int, start: int, end: int) -> torch.Tensor:
        """Row ``row``'s keys and values of positions start..end, ``[layers, 2, kv_heads,
        end - start, head_dim]`` (a view: copy what is kept)."""
        return self._cache.kv[:, :, row, :, start:end]

    def remove(self, leaving: Sequence[int]) -> None:
        """Frees the slots of rows ``leaving`` (indices into ``rows``); the last rows move
        into the gaps, so rows stay packed. Queued after any step in flight."""
        if not leaving:
            return
        gone = set(leaving)
        staying = [row for row in range(len(self.rows)) if row not in gone]
        count = len(staying)
        movers = [row for row in staying if row >= count]
        gaps = [row for row in range(count) if row in gone]
        if movers:
            source = torch.tensor(movers, device=self._positions.device)
            target = torch.tensor(gaps, device=self._positions.device)
            used = min(max(self._lengths[row] for row in movers), self.slot_length)
            kv = self._cache.kv
            kv[:, :, target, :, :used] = kv[:, :, source, :, :used]
            for tensor in self._per_slot_state():
                tensor[target] = tensor[source]
        order = list(range(count))
        for gap, mover in zip(gaps, movers, strict=True):
            order[gap] = mover
        self.rows = [self.rows[row] for row in order]
        self._lengths = [self._lengths[row] for row in order]
        self._samples = [self._samples[row] for row in order]

    def _per_slot_state(self) -> list[torch.Tensor]:
        """Every per-slot tensor but the KV cache (slot first)."""
        return [self._input_ids, self._positions, self._counters, self._seeds, self._temperature,
                self._top_p, self._top_k, self._penalty, self._seen, self._presence, self._frequency,
                self._counts, self._adapter_slots, self._chosen]

    def clear(self) -> None:
        """Forgets every row (after a failed step)."""
        self.rows, self._lengths, self._samples = [], [], []
