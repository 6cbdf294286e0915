"""What the scheduler and the two decoding strategies (`dynamic_decoding`,
`slot_decoding`) share: the loaded model with its calling conventions, the prefilled rows
handed from one to the other, and the strategy's interface."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence

import torch

from deployments.transformers_engine.lora import Adapters
from deployments.transformers_engine.prefix_cache import PrefixCache
from deployments.transformers_engine.rows import Delivery, Row


@dataclasses.dataclass
class LoadedModel:
    """A causal LM as the scheduler calls it."""

    model: torch.nn.Module
    name: str  # the served model's name (metrics)
    device: str
    # transformers renamed `past_key_values` to `cache` (5.2x); either is accepted.
    cache_argument: str
    adapters: Adapters | None = None
    output_layer: torch.nn.Module | None = None  # when prompts can be scored from hidden states

    def use_adapters(self, slots: Sequence[int]) -> None:
        """Tells the LoRA layers each row's adapter slot for the next forward pass (none
        when no row uses one: the base model's rows then cost nothing extra)."""
        if self.adapters is not None:
            self.adapters.rows.use(torch.tensor(slots, device=self.device) if any(slots) else None)

    def forward(self, cache, backbone: bool = False, **inputs):
        """The model's output for ``inputs`` with ``cache`` (None: a new one);
        ``backbone``: the decoder's hidden states, without the output layer."""
        if cache is not None:
            inputs[self.cache_argument] = cache
        return (self.model.get_decoder() if backbone else self.model)(use_cache=True, **inputs)

    def cache_of(self, output):
        """The cache a forward pass returned (the output field has the argument's name)."""
        return output[self.cache_argument]


@dataclasses.dataclass
class Prefilled:
    """Prompts fully run: a row per returned sequence, left-padded (a row's cached prefix
    and the rest of its prompt may have masked columns between them), with the scores of
    each row's first new token."""

    rows: list[Row]
    cache: object  # transformers' DynamicCache
    attention_mask: torch.Tensor  # [rows, columns]
    last_position: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab], float32

    @property
    def prompts(self) -> list[tuple[int, ...]]:
        return [row.admission.request.prompt_token_ids for row in self.rows]


class Decoding(abc.ABC):
    """How the scheduler decodes its running rows: `DynamicDecoding` or `SlotDecoding`.
    With a ``prefix_cache``, a row that ends leaves its answer's KV there, so that the
    next turn of its conversation finds it."""

    def __init__(self, model: LoadedModel, delivery: Delivery, prefix_cache: PrefixCache | None = None) -> None:
        self.model, self.delivery, self.prefix_cache = model, delivery, prefix_cache

    def _keep_answer(self, row: Row, history_of: Callable[[int, int], torch.Tensor]) -> None:
        """Stores a leaving row's prompt and answer (all but its last token, whose KV
        was never computed) in the prefix cache; ``history_of(start, end)`` gives the
        row's KV of tokens start..end in the cache's layout (see PrefixCache.store)."""
        # Not the cancelled event: a caller that got its last token sets it too, at once.
        if self.prefix_cache is not None and not row.dropped:
            request = row.admission.request
            self.prefix_cache.store([*request.prompt_token_ids, *row.token_ids[:-1]], request.adapter, history_of)

    @property
    @abc.abstractmethod
    def busy(self) -> bool:
        """Rows running, or tokens not yet handed over."""

    @abc.abstractmethod
    def free_rows(self) -> int:
        """Rows that newly prefilled sequences may take now."""

    def fits(self, rows: int, width: int, tokens: int) -> bool:
        """Whether ``rows`` more rows, whose prompts are ``width`` tokens at most and
        ``tokens`` together, may join the running batch now, as far as its memory goes
        (free rows are counted apart, by `free_rows`). Rows of fixed length (slots)
        always fit."""
        return True

    @abc.abstractmethod
    def join(self, prefilled: Prefilled) -> None:
        """Takes newly prefilled rows into the running batch."""

    @abc.abstractmethod
    def step(self) -> None:
        """One decode step of the running rows, if any; hands tokens over."""

    @abc.abstractmethod
    def rows(self) -> list[Row]:
        """Every row still owed tokens (to fail them when a step fails)."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Forgets every row (after a failed step)."""
