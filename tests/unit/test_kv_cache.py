"""The growing cache layer holds exactly what transformers' DynamicLayer holds, and a
decode step writes in place instead of copying the history."""

import torch
from transformers.cache_utils import DynamicLayer

from deployments.transformers_engine.kv_cache import GrowingLayer


def states(rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 3, columns, 8), torch.randn(rows, 3, columns, 8)


def test_matches_dynamic_layer_through_steps_row_drops_and_column_drops():
    torch.manual_seed(0)
    prompt = states(4, 5)
    reference = DynamicLayer()
    reference.update(*prompt)
    growing = GrowingLayer(*prompt)
    for step in range(40):
        new = states(len(reference.keys), 1)
        expected = reference.update(*new)
        got = growing.update(*new)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        if step == 10:  # a row left the batch
            rows = torch.tensor([0, 2, 3])
            reference.batch_select_indices(rows)
            growing.batch_select_indices(rows)
        if step == 20:  # and the leading columns nobody attends to went with it
            for layer in (reference, growing):
                layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]
    assert growing.get_seq_length() == reference.get_seq_length() == 5 + 40 - 3


def test_a_decode_step_writes_into_the_same_buffer():
    growing = GrowingLayer(*states(2, 64))
    growing.update(*states(2, 1))  # the first step moves the history into a buffer with room
    first = growing.keys.data_ptr()
    for _ in range(8):
        growing.update(*states(2, 1))
    assert growing.keys.data_ptr() == first and growing.get_seq_length() == 64 + 9
