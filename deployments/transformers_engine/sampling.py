"""Per-row token selection for a batch whose rows have different sampling parameters.

`model.generate` applies one GenerationConfig to the whole batch, so mixing requests
with different temperature/top_p/top_k/repetition_penalty/seed in one batch would
sample some of them with another's parameters. Here every parameter is a per-row tensor
and every row draws from its own `torch.Generator`, so a row's tokens depend only on its
own logits, parameters and seed, never on its neighbours. The order of the processors
is vLLM's: repetition penalty (over prompt and generated tokens, as transformers'),
then OpenAI's frequency and presence penalties (over generated tokens), then
temperature, top-k and top-p as transformers orders them.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Sampling parameters of one sequence; ``temperature == 0`` means greedy."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def penalize_generated(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: each token's logit less ``frequency`` x the times the row has
    generated it, less ``presence`` if it has at all (``counts`` [rows, vocab])."""
    counts = counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


class BatchSampler:
    """Chooses the next token of every row of a batch.

    Args:
        rows: parameters per row.
        prompt_token_ids: each row's prompt, seen by the repetition penalty (as in
            transformers, the penalty covers prompt and generated tokens).
        vocab_size: width of the logits.
        device: where the logits live.
    """

    def __init__(
        self,
        rows: Sequence[RowSampling],
        prompt_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> None:
        self._device = torch.device(device)
        self._vocab_size = vocab_size
        self._temperature = torch.tensor([r.temperature for r in rows], device=self._device)
        self._top_p = torch.tensor([r.top_p for r in rows], device=self._device)
        self._top_k = torch.tensor([r.top_k for r in rows], dtype=torch.long, device=self._device)
        self._penalty = torch.tensor([r.repetition_penalty for r in rows], device=self._device)
        self._presence = torch.tensor([r.presence_penalty for r in rows], device=self._device)
        self._frequency = torch.tensor([r.frequency_penalty for r in rows], device=self._device)
        self._generators = [self._generator(r.seed) for r in rows]
        # Made only for a batch that has a row to penalise (a join adds them if needed).
        self._seen: torch.Tensor | None = None  # [rows, vocab], tokens in prompt or output
        self._counts: torch.Tensor | None = None  # [rows, vocab], times each was generated
        if bool((self._penalty != 1.0).any()):
            self._seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=self._device)
            for row, ids in enumerate(prompt_token_ids):
                self._seen[row, torch.tensor(ids, dtype=torch.long, device=self._device)] = True
        if bool(((self._presence != 0) | (self._frequency != 0)).any()):
            self._counts = torch.zeros(len(rows), vocab_size, dtype=torch.int32, device=self._device)

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self._device)
        generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return generator

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Picks one token per row from float32 ``logits`` of shape [rows, vocab]."""
        if self._seen is not None:
            penalty = self._penalty[:, None]
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self._seen, penalized, logits)
            if bool((self._penalty < _OVERFLOWING_DIVISOR).any()):
                logits = _finite(logits)
        if self._counts is not None:
            logits = penalize_generated(logits, self._counts, self._presence, self._frequency)
        next_tokens = logits.argmax(dim=-1)
        sampled_rows = (self._temperature > 0).nonzero().flatten()
        if sampled_rows.numel() == 0:
            return next_tokens
        temperature = self._temperature[sampled_rows]
        scores = logits[sampled_rows] / temperature[:, None]
        if bool((temperature < _OVERFLOWING_DIVISOR).any()):
            scores = _finite(scores)
        scores = self._apply_top_k(scores, self._top_k[sampled_rows])
        probabilities = scores.softmax(dim=-1)
        top_p = self._top_p[sampled_rows]
        generators = [self._generators[row] for row in sampled_rows.tolist()]
        next_tokens[sampled_rows] = _draw_nucleus(probabilities, top_p, generators)
        return next_tokens

    @staticmethod
    def _apply_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        top_k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
        if bool((top_k == vocab).all()):
            return scores
        largest = int(top_k.max())
        kth_best = scores.topk(largest, dim=-1).values.gather(1, (top_k - 1)[:, None])
        return scores.masked_fill(scores < kth_best, float("-inf"))

    def observe(self, tokens: torch.Tensor) -> None:
        """Records the tokens just chosen, for the penalties."""
        if self._seen is not None:
            self._seen.scatter_(1, tokens[:, None], True)
        if self._counts is not None:
            self._counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self._counts.dtype))

    def keep(self, rows: torch.Tensor) -> None:
        """Keeps only ``rows`` (indices into the current rows), in that order."""
        self._temperature = self._temperature[rows]
        self._top_p = self._top_p[rows]
        self._top_k = self._top_k[rows]
        self._penalty = self._penalty[rows]
        self._presence = self._presence[rows]
        self._frequency = self._frequency[rows]
        self._generators = [self._generators[i] for i in rows.tolist()]
        if self._seen is not None:
            self._seen = self._seen[rows]
        if self._counts is not None:
            self._counts = self._counts[rows]

    def __len__(self) -> int:
        return len(self._generators)

    def join(self, other: "BatchSampler") -> None:
        """Appends ``other``'s rows after these (continuous batching)."""
        self._temperature = torch.cat([self._temperature, other._temperature])
        self._top_p = torch.cat([self._top_p, other._top_p])
        self._top_k = torch.cat([self._top_k, other._top_k])
        self._penalty = torch.cat([self._penalty, other._penalty])
        self._presence = torch.cat([self._presence, other._presence])
        self._frequency = torch.cat([self._frequency, other._frequency])
        self._seen = self._joined_marks(self._seen, other._seen, len(other), torch.bool)
        self._counts = self._joined_marks(self._counts, other._counts, len(other), torch.int32)
        self._generators = self._generators + other._generators

    def _joined_marks(
        self, mine: torch.Tensor | None, theirs: torch.Tensor | None, their_rows: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Per-token marks [rows, vocab] of both batches, stacked; a batch that had none
        (no row needed them) counts as all zeros."""
        if mine is None and theirs is None:
            return None

        def zeros(rows: int) -> torch.Tensor:
            return torch.zeros(rows, self._vocab_size, dtype=dtype, device=self._device)

        return torch.cat([zeros(len(self)) if mine is None else mine, zeros(their_rows) if theirs is None else theirs])


# Candidates examined for top-p before falling back to sorting the whole vocabulary.
NUCLEUS_CANDIDATES = 4096
# Dividing float32 logits (|logit| well under 1e30) by anything this large or larger
# cannot overflow, so the inf/NaN guard is needed only below it.
_OVERFLOWING_DIVISOR = 1e-6


def _draw_nucleus(
    probabilities: torch.Tensor, top_p: torch.Tensor, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row from ``probabilities`` [rows, vocab], restricted to each row's
    nucleus: the most likely tokens, in order, until the mass before a token exceeds
    its row's ``top_p`` (the most likely token always survives).

    Sorting a 50k vocabulary per row per step costs more than the rest of sampling, so
    the nucleus is looked for among the ``NUCLEUS_CANDIDATES`` most likely tokens first;
    that is exact whenever their mass exceeds ``top_p`` (every later token then has
    more than ``top_p`` before it). Rows whose nucleus is wider, and rows with
    ``top_p >= 1`` (no nucleus), draw from their whole row. Each row draws one uniform
    number from its own generator and inverts its cumulative distribution.
    """
    rows, vocab = probabilities.shape
    uniforms = torch.stack([torch.rand((), generator=generator, device=probabilities.device) for generator in generators])
    chosen = torch.empty(rows, dtype=torch.long, device=probabilities.device)
    candidates, candidate_ids = probabilities.topk(min(NUCLEUS_CANDIDATES, vocab), dim=-1)
    whole_row = top_p >= 1.0
    in_candidates = ~whole_row & (candidates.sum(dim=-1) > top_p)
    wide = ~whole_row & ~in_candidates
    if bool(in_candidates.any()):
        chosen[in_candidates] = _invert(
            _nucleus(candidates[in_candidates], top_p[in_candidates]),
            candidate_ids[in_candidates],
            uniforms[in_candidates],
        )
    if bool(wide.any()):
        ordered, ordered_ids = probabilities[wide].sort(dim=-1, descending=True)
        chosen[wide] = _invert(_nucleus(ordered, top_p[wide]), ordered_ids, uniforms[wide])
    if bool(whole_row.any()):
        chosen[whole_row] = _invert(probabilities[whole_row], None, uniforms[whole_row])
    return chosen


def _nucleus(descending: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zeroes the probabilities (sorted descending) that fall outside the nucleus."""
    mass_before = descending.cumsum(dim=-1) - descending
    return descending.masked_fill(mass_before > top_p[:, None], 0.0)


def _invert(weights: torch.Tensor, ids: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the id at which the cumulative weight first exceeds ``uniform`` x total."""
    cumulative = weights.cumsum(dim=-1)
    total = cumulative[:, -1]
    # Below the total even where uniform x total rounds up to it, so that a zero-weight
    # token after the last positive one is never picked.
    targets = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))[:, None]
    positions = torch.searchsorted(cumulative, targets, right=True).clamp(max=weights.shape[-1] - 1)
    return (positions if ids is None else ids.gather(1, positions)).squeeze(1)


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """Valid but extreme parameters (a repetition penalty or temperature of 1e-40, which
    float32 holds as 0 or a denormal) divide logits into inf, and softmax turns inf into
    NaN; capping at the largest float keeps the intended order: that token wins."""
    return torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)


# The sampler of the slot decoder (slot_decoder.py): every operation is a tensor
# operation over all rows, with no branch on tensor values and no per-row generator,
# so a decode step and its sampling are one CUDA graph with no host synchronisation.
# BatchSampler above stays the dynamic-cache path's sampler: on a CPU its candidate
# search beats sorting the whole vocabulary, and the host syncs it needs cost nothing there.

_LOW_32_BITS = 0xFFFFFFFF


def _mix32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Chris Wellons' lowbias32) of int64 ``values``, elementwise.
    Products may overflow int64; their low 32 bits, the only ones kept, are exact."""
    x = values & _LOW_32_BITS
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _LOW_32_BITS
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _LOW_32_BITS
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row, a pure function of the row's seed (int64,
    non-negative) and its count of tokens drawn so far: a row's draws never depend on its
    neighbours or on the order rows were batched in, as with a generator per row."""
    mixed = _mix32(seeds ^ _mix32((seeds >> 32) ^ _mix32(counters)))
    return (mixed >> 8).to(torch.float32) * (1.0 / (1 << 24))


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    penalty: torch.Tensor,
    seen: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    counts: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    sampled: bool,
) -> torch.Tensor:
    """The next token of every row, from float32 ``logits`` [rows, vocab]; each parameter
    is a per-row tensor, ``seen`` [rows, vocab] marks the tokens the repetition penalty
    covers, ``counts`` [rows, vocab] the times each token was generated. Same processors
    and order as BatchSampler (repetition penalty, frequency and presence penalties,
    temperature, top-k, top-p); rows with ``temperature == 0`` are greedy. ``sampled`` is
    the host's knowledge that some row samples or is penalised: False skips straight to
    argmax."""
    if not sampled:
        return logits.argmax(dim=-1)
    penalty = penalty[:, None]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = _finite(torch.where(seen, penalized, logits))
    logits = penalize_generated(logits, counts, presence, frequency)
    greedy = logits.argmax(dim=-1)
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    ordered, ordered_ids = _finite(logits / scale[:, None]).sort(dim=-1, descending=True)
    vocab = ordered.shape[-1]
    rank = torch.arange(vocab, device=logits.device)
    keep = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    probabilities = ordered.masked_fill(rank >= keep[:, None], float("-inf")).softmax(dim=-1)
    mass_before = probabilities.cumsum(dim=-1) - probabilities
    outside = (mass_before > top_p[:, None]) & (top_p < 1.0)[:, None]
    drawn = _invert(probabilities.masked_fill(outside, 0.0), ordered_ids, counter_uniforms(seeds, counters))
    return torch.where(temperature > 0, drawn, greedy)


@dataclasses.dataclass(frozen=True)
class RowScores:
    """What `score_rows` found, on the host: per row, the chosen token's log
    probability, and the likeliest tokens' ids and log probabilities, best first."""

    chosen: list[float]
    top_ids: list[list[int]]
    top: list[list[float]]


def score_rows(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log probabilities of the model's raw ``logits`` [rows, vocab] (before any
    penalty, temperature, truncation or mask): the ``chosen`` tokens', and the ``top``
    likeliest tokens' values and ids. Tensor operations only (it runs in CUDA graphs)."""
    logprobs = logits.float().log_softmax(dim=-1)
    best = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return logprobs.gather(1, chosen[:, None])[:, 0], best.values, best.indices
