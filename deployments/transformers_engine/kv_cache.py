"""Joining and trimming transformers' DynamicCache along the batch, for continuous
batching. Rows are left-padded: every row's history ends at the last column, so two
caches of different lengths join by padding the shorter one on the left (those columns
are masked out by the attention mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def can_join(cache: DynamicCache) -> bool:
    """Only full-attention layers keep every position; sliding-window and other layer
    kinds drop or transform history, and are not joined (the engine then batches
    statically)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, columns, 0)) if columns else tensor


def join(running: DynamicCache, joining: DynamicCache) -> None:
    """Appends ``joining``'s rows to ``running`` (in place), padding the shorter history."""
    running_length, joining_length = running.get_seq_length(), joining.get_seq_length()
    length = max(running_length, joining_length)
    for mine, theirs in zip(running.layers, joining.layers, strict=True):
        mine.keys = torch.cat(
            [_left_pad(mine.keys, length - running_length), _left_pad(theirs.keys, length - joining_length)]
        )
        mine.values = torch.cat(
            [_left_pad(mine.values, length - running_length), _left_pad(theirs.values, length - joining_length)]
        )


def drop_leading_columns(cache: DynamicCache, columns: int) -> None:
    """Removes the first ``columns`` positions of every row (columns masked for all rows)."""
    if columns:
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, columns:, :]
            layer.values = layer.values[:, :, columns:, :]
