"""Token ids to text, one token at a time, with stop strings.

Engine-agnostic: it needs only a ``decode(ids) -> str`` function, so the transformers
engine and the tests' fake engine share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
_INCOMPLETE_CHARACTER = "\ufffd"


class IncrementalDecoder:
    """Decodes a growing list of token ids into text deltas.

    Decoding each token alone breaks multi-byte characters and drops the spaces that
    sentencepiece-style tokenizers attach to the next token, so this decodes a short
    window that starts one token before the new ones and emits what the window adds
    (the approach of TGI and vLLM). A window that ends in an incomplete UTF-8 sequence
    emits nothing until the next token completes it.
    """

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def append(self, token_id: int) -> str:
        """Adds one token and returns the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_INCOMPLETE_CHARACTER):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringFilter:
    """Holds back text that may be the start of a stop string, and cuts at a match.

    A match always begins in the held-back text, because any suffix that could start
    a stop string is never released; so only that buffer needs searching.
    """

    def __init__(self, stop: Sequence[str], include_stop: bool = False) -> None:
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Adds decoded text; returns what is safe to emit now."""
        if self.stopped:
            return ""
        self._pending += text
        if not self._stop:
            released, self._pending = self._pending, ""
            return released
        match_at, matched = min(
            ((i, -len(s)) for i, s in ((self._pending.find(s), s) for s in self._stop) if i >= 0),
            default=(-1, 0),
        )
        if match_at >= 0:
            self.stopped = True
            end = match_at - matched if self._include_stop else match_at  # the longest stop found there
            released, self._pending = self._pending[:end], ""
            return released
        hold = self._longest_suffix_starting_a_stop()
        cut = len(self._pending) - hold
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released

    def flush(self) -> str:
        """Releases what was held back (the sequence ended without a stop match)."""
        released, self._pending = self._pending, ""
        return released

    def _longest_suffix_starting_a_stop(self) -> int:
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class SequenceText:
    """One generated sequence's text: incremental decoding followed by stop strings."""

    def __init__(self, decode: Decode, stop: Sequence[str], include_stop: bool = False) -> None:
        self._decoder = IncrementalDecoder(decode)
        self._filter = StopStringFilter(stop, include_stop)

    @property
    def stopped(self) -> bool:
        """Whether a stop string has matched; the sequence must end."""
        return self._filter.stopped

    def append(self, token_id: int) -> str:
        """Adds a generated token; returns the text to emit for it."""
        return self._filter.feed(self._decoder.append(token_id))

    def finish(self) -> str:
        """Returns the held-back text when the sequence ends for another reason."""
        return self._filter.flush()
