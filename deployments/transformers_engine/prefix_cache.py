"""Automatic prefix caching: the keys and values of prompt (and answer) tokens already
computed, kept in blocks so that a request whose prompt starts the same way (a system
prompt, a tool list, the conversation so far) prefills only the rest.

As in vLLM's automatic prefix caching: a prompt is cut into blocks of ``BLOCK_TOKENS``
tokens; a block is known by a hash of its tokens chained with its parent's hash and the
adapter (so a block is reused only after the very same tokens, and adapters never share
KV). Blocks are evicted least recently used first, the end of a chain before its start
(a lookup touches a chain from its end to its start), within a byte budget. A row gets
copies of its blocks, so eviction never takes what a running row uses.

A block is one tensor ``[layers, 2, kv_heads, BLOCK_TOKENS, head_dim]``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

# Tokens per block: smaller blocks reuse more of a prefix that diverges mid-block, larger
# ones cost fewer lookups and copies (vLLM's default is 16).
BLOCK_TOKENS = 16


def block_hashes(token_ids: Sequence[int], adapter: str | None) -> list[int]:
    """The chained hash of every whole block of ``token_ids``. Python's tuple hash is
    64 bits wide and salted per process, which is all a cache inside one process
    needs (a collision, at 2^-64 per pair, would reuse another prefix's KV)."""
    hashes, parent = [], hash(("prefix", adapter))
    for start in range(0, len(token_ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        parent = hash((parent, tuple(token_ids[start : start + BLOCK_TOKENS])))
        hashes.append(parent)
    return hashes


@dataclasses.dataclass(frozen=True)
class CachedPrefix:
    """What a lookup found: the first ``tokens`` tokens' KV, block by block, and the
    hash of the first whole block not found (None: none left to compute)."""

    tokens: int
    blocks: tuple[torch.Tensor, ...]
    next_block: int | None = None


NO_PREFIX = CachedPrefix(0, ())  # also what a prompt that skips the cache gets


class PrefixCache:
    """Blocks of KV by chained hash, within ``budget_bytes``.

    Args:
        budget_bytes: what the blocks may take at most.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._blocks: OrderedDict[int, torch.Tensor] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, token_ids: Sequence[int], adapter: str | None) -> CachedPrefix:
        """The longest cached prefix of ``token_ids`` short of its last token (whose
        logits the caller needs, so it is always computed). The blocks found are
        the caller's to copy: evicting them later takes nothing from it."""
        hashes = block_hashes(token_ids[:-1], adapter)
        found = 0
        while found < len(hashes) and hashes[found] in self._blocks:
            found += 1
        self._touch(hashes[:found])
        return CachedPrefix(
            found * BLOCK_TOKENS,
            tuple(self._blocks[block_hash] for block_hash in hashes[:found]),
            next_block=hashes[found] if found < len(hashes) else None,
        )

    def store(
        self, token_ids: Sequence[int], adapter: str | None, history_of: Callable[[int, int], torch.Tensor]
    ) -> None:
        """Keeps the whole blocks of ``token_ids`` not kept yet, evicting the least
        recently used to make room. ``history_of(start, end)`` gives the keys and values
        of tokens start..end, ``[layers, 2, kv_heads, end - start, head_dim]``; it is
        asked once, for the blocks from the first missing one (often none: a prompt that
        came from this cache), so nothing kept already is copied again."""
        hashes = block_hashes(token_ids, adapter)
        first_missing = next((at for at, block_hash in enumerate(hashes) if block_hash not in self._blocks), None)
        if first_missing is not None:
            start = first_missing * BLOCK_TOKENS
            history = history_of(start, len(hashes) * BLOCK_TOKENS)
            block_bytes = history[:, :, :, :BLOCK_TOKENS].numel() * history.element_size()
            hashes = hashes[: self.budget_bytes // block_bytes]  # a prefix longer than the budget keeps its start
            self._touch(hashes[:first_missing])  # spared: not evicted first
            for position in range(first_missing, len(hashes)):
                if hashes[position] in self._blocks:
                    continue
                self._evict_for(block_bytes, keep=hashes[:position])
                offset = position * BLOCK_TOKENS - start
                self._blocks[hashes[position]] = history[:, :, :, offset : offset + BLOCK_TOKENS].clone()
                self.bytes += block_bytes
        self._touch([block_hash for block_hash in hashes if block_hash in self._blocks])

    def _touch(self, chain: list[int]) -> None:
        """Marks a chain as just used, its start the most recent: its end goes first."""
        for block_hash in reversed(chain):
            self._blocks.move_to_end(block_hash)

    def _evict_for(self, new_bytes: int, keep: list[int]) -> None:
        """Evicts least recently used blocks until ``new_bytes`` more fit, sparing the
        blocks of ``keep`` (the chain being stored)."""
        spared = set(keep)
        while self.bytes + new_bytes > self.budget_bytes and len(self._blocks) > len(spared):
            block_hash = next(block_hash for block_hash in self._blocks if block_hash not in spared)
            block = self._blocks.pop(block_hash)
            self.bytes -= block.numel() * block.element_size()

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
