"""Decoding with transformers' DynamicCache: rows left-padded to a shared last column,
joined and trimmed as they come and go, eager steps. The CPU's path (slots, eager there,
gave 0.95 of its tokens/s at 1 client and 0.92 at 16 on 2 EPYC cores:
bench/results/kv_cache_cpu.json)."""

from __future__ import annotations

import dataclasses

import torch

from deployments import metrics
from deployments.protocol import MAX_TOP_LOGPROBS
from deployments.transformers_engine import kv_cache
from deployments.transformers_engine.decoding import Decoding, LoadedModel, Prefilled
from deployments.transformers_engine.prefix_cache import PrefixCache
from deployments.transformers_engine.grammars import mask_disallowed
from deployments.transformers_engine.rows import Delivery, Row
from deployments.transformers_engine.sampling import BatchSampler, RowScores, score_rows


@dataclasses.dataclass
class _Batch:
    """The rows being decoded, left-padded: every row's history ends at the last column
    of ``attention_mask`` and of the KV cache."""

    rows: list[Row]
    cache: object  # transformers' DynamicCache
    attention_mask: torch.Tensor  # [rows, columns]
    last_position: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab]: scores of each row's next token, not yet sampled
    sampler: BatchSampler

    @classmethod
    def of(cls, prefilled: Prefilled, joinable: bool) -> _Batch:
        if joinable:  # all layers keep full history: decode steps write in place
            kv_cache.growing(prefilled.cache)
        return cls(
            rows=prefilled.rows,
            cache=prefilled.cache,
            attention_mask=prefilled.attention_mask,
            last_position=prefilled.last_position,
            logits=prefilled.logits,
            sampler=BatchSampler(
                [row.sampling for row in prefilled.rows],
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
        self.rows = self.rows + other.rows

    def keep(self, rows: list[int]) -> None:
        """Keeps only ``rows`` (a non-empty subset, in order), then drops the history
        columns that no remaining row attends to."""
        if len(rows) == len(self.rows):
            return
        index = torch.tensor(rows, device=self.logits.device)
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.last_position = self.last_position[index]
        self.logits = self.logits[index]
        self.sampler.keep(index)
        self.rows = [self.rows[row] for row in rows]
        unused = int(self.attention_mask.any(dim=0).int().argmax())
        if unused:
            kv_cache.drop_leading_columns(self.cache, unused)
            self.attention_mask = self.attention_mask[:, unused:]


class DynamicDecoding(Decoding):
    """Rows in one left-padded `_Batch`. ``joinable``: whether the model's cache layers
    can be joined along the batch; where not (sliding windows), batching is static and
    newcomers wait for the running batch to finish."""

    def __init__(
        self, model: LoadedModel, delivery: Delivery, max_rows: int, joinable: bool,
        prefix_cache: PrefixCache | None = None, max_padded_tokens: int | None = None,
    ) -> None:
        super().__init__(model, delivery, prefix_cache)
        self._max_rows, self._joinable = max_rows, joinable
        self._max_padded_tokens = max_padded_tokens
        self._batch: _Batch | None = None

    @property
    def busy(self) -> bool:
        return self._batch is not None

    def free_rows(self) -> int:
        if self._batch is None:
            return self._max_rows
        if not self._joinable:
            return 0
        return self._max_rows - len(self._batch.rows)

    def fits(self, rows: int, width: int, tokens: int) -> bool:
        """Every row is padded to the longest: joined, the batch would hold rows x width
        tokens of KV, which must stay within ``max_padded_tokens`` or within twice the
        tokens its rows really hold (one 8k-token prompt would otherwise pad fifteen
        short rows to 8k each, while rows of alike lengths waste little)."""
        if self._max_padded_tokens is None:
            return True
        running, columns, held = 0, 0, 0
        if self._batch is not None:
            running, columns = len(self._batch.rows), self._batch.attention_mask.shape[1]
            held = int(self._batch.attention_mask.sum())
        padded = (running + rows) * max(columns, width)
        return padded <= self._max_padded_tokens or padded <= 2 * (held + tokens)

    def join(self, prefilled: Prefilled) -> None:
        joining = _Batch.of(prefilled, self._joinable)
        if self._batch is None:
            self._batch = joining
        else:
            self._batch.join(joining)

    def step(self) -> None:
        if self._batch is not None:
            self._batch = self._step(self._batch)

    def rows(self) -> list[Row]:
        return self._batch.rows if self._batch else []

    def clear(self) -> None:
        self._batch = None

    def _keep_answers(self, batch: _Batch, still_running: list[int]) -> None:
        staying = set(still_running)
        for position, row in enumerate(batch.rows):
            if position not in staying:
                self._keep_answer(
                    row, lambda start, end, row_at=position: kv_cache.row_history(
                        batch.cache, batch.attention_mask, row_at, start, end
                    )
                )

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> _Batch | None:
        """Samples every row's next token, delivers it, drops the rows that ended or whose
        caller left, and runs the forward pass for the rest. Returns None when no row is
        left. Rows leave in one `keep` (each one copies the KV cache)."""
        logits = batch.logits
        allowed = self.delivery.allowed_tokens(batch.rows)
        if allowed is not None:
            logits = mask_disallowed(logits, allowed.to(logits.device))
        next_tokens = batch.sampler.sample(logits)  # cancelled rows too: cheaper than a keep
        batch.sampler.observe(next_tokens)
        scores = None
        if self.delivery.wants_scores(batch.rows):
            chosen, top, top_ids = score_rows(batch.logits, next_tokens, MAX_TOP_LOGPROBS)
            scores = RowScores(chosen.tolist(), top_ids.tolist(), top.tolist())
        still_running = self.delivery.deliver(batch.rows, next_tokens.tolist(), scores)
        if self.prefix_cache is not None and len(still_running) < len(batch.rows):
            self._keep_answers(batch, still_running)
        if not still_running:
            return None
        batch.keep(still_running)
        next_tokens = next_tokens[torch.tensor(still_running, device=next_tokens.device)]
        batch.attention_mask = torch.cat(
            [batch.attention_mask, batch.attention_mask.new_ones(len(still_running), 1)], dim=1
        )
        batch.last_position = batch.last_position + 1
        metrics.record_batch_size(self.model.name, len(still_running))
        self.model.use_adapters([row.admission.adapter_slot for row in batch.rows])
        output = self.model.forward(
            batch.cache,
            input_ids=next_tokens[:, None],
            attention_mask=batch.attention_mask,
            position_ids=batch.last_position[:, None],
        )
        batch.logits = output.logits[:, -1, :].float()
        return batch
