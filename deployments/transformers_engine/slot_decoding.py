"""Decoding with the slot decoder (`slot_decoder.py`; CUDA graphs on a GPU), one step
ahead of the host: each step is launched before the tokens of the previous one are
handed over, so the host's work overlaps the GPU's. A row that ends is decoded once more
before the host sees it end; that token is dropped."""

from __future__ import annotations

from collections import deque

import torch

from deployments import metrics
from deployments.transformers_engine.decoding import Decoding, LoadedModel, Prefilled
from deployments.transformers_engine.prefix_cache import PrefixCache
from deployments.transformers_engine.rows import Delivery, Row
from deployments.transformers_engine.slot_decoder import SlotDecoder, Tokens


class SlotDecoding(Decoding):
    def __init__(
        self, model: LoadedModel, delivery: Delivery, decoder: SlotDecoder, prefix_cache: PrefixCache | None = None
    ) -> None:
        super().__init__(model, delivery, prefix_cache)
        self.decoder = decoder
        self._in_flight: deque[Tokens] = deque()

    @property
    def busy(self) -> bool:
        return bool(self.decoder.rows or self._in_flight)

    def free_rows(self) -> int:
        return self.decoder.free_slots

    @torch.inference_mode()
    def join(self, prefilled: Prefilled) -> None:
        rows = prefilled.rows
        self._in_flight.append(
            self.decoder.join(
                rows, [row.sampling for row in rows], prefilled.prompts,
                prefilled.cache, prefilled.attention_mask, prefilled.logits,
                allowed=self.delivery.allowed_tokens(rows),
                scored=self.delivery.wants_scores(rows),
                adapter_slots=[row.admission.adapter_slot for row in rows],
            )
        )

    @torch.inference_mode()
    def step(self) -> None:
        # A constrained row's mask needs its last token (a min_tokens row, its count), so
        # while one runs the host does not work a step behind: every step in flight is
        # handed over first.
        constrained = any(row.masked for row in self.decoder.rows)
        if constrained:
            self._hand_over(keep=0)
        launched = bool(self.decoder.rows)
        if launched:
            metrics.record_batch_size(self.model.name, len(self.decoder.rows))
            allowed = self.delivery.allowed_tokens(self.decoder.rows) if constrained else None
            self._in_flight.append(self.decoder.step(allowed, scored=self.delivery.wants_scores(self.decoder.rows)))
        self._hand_over(keep=1 if launched else 0)

    def _hand_over(self, keep: int) -> None:
        """Hands over the tokens of the steps in flight but the last ``keep``, and frees
        the slots of the rows that ended."""
        while len(self._in_flight) > keep:
            tokens = self._in_flight.popleft()
            self.delivery.deliver(tokens.rows, tokens.token_ids(), tokens.scores)
            leaving = [position for position, row in enumerate(self.decoder.rows) if row.finished]
            for position in leaving:
                self._keep_answer(
                    self.decoder.rows[position], lambda start, end, row_at=position: self.decoder.history(row_at, start, end)
                )
            self.decoder.remove(leaving)

    def rows(self) -> list[Row]:
        return [*self.decoder.rows, *(row for tokens in self._in_flight for row in tokens.rows)]

    def clear(self) -> None:
        self.decoder.clear()
        self._in_flight.clear()
