"""Structured outputs: a row's next token restricted to what keeps its text inside a JSON
schema or a regular expression, with llguidance.

Why llguidance (measured on this project's 2-core EPYC, SmolLM2's tokenizer, against
xgrammar 0.2.9 and outlines-core 0.2.14): it refuses a schema keyword it cannot enforce
(`not`, `uniqueItems`, `if`) with an error that names it, where xgrammar ignores such
keywords silently and outlines-core ignores numeric bounds; it enforces `minimum`,
`maximum`, `multipleOf`, `$defs`/`$ref` (pydantic's nested models); compiles a schema in
0.4-3 ms; and installs as one 3 MB wheel with no dependencies (xgrammar requires triton,
286 MB). Its mask costs 11-13 us per row and token, against xgrammar's 4: on a CPU step of
tens of milliseconds that is noise.

Each constrained row owns a matcher (a copy of its schema's compiled template) that
consumes the row's tokens; before a row's token is chosen, its matcher fills the row's
bitmask (bit i of word j: token 32 j + i may come next), and the other tokens' logits
become -inf. Rows without a constraint are never masked, so constrained and free rows
share a batch.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Sequence

import llguidance
import llguidance.hf
import torch

from deployments.protocol import InvalidRequestError, OutputConstraint

# Compiled templates kept per engine (least recently used go first).
COMPILED_GRAMMARS_KEPT = 256
# JSON: no whitespace between tokens (the compact form), so a model cannot spend its
# tokens on spaces and newlines, and greedy output stays short.
_JSON_DEFAULTS = {"whitespace_flexible": False}
_REASON_CHARS = 400


class Grammars:
    """Compiles constraints for one model's tokenizer, each once (bounded LRU), and
    hands out a fresh matcher per constrained row. Thread-safe: requests are prepared
    in threads.

    Args:
        tokenizer: the model's HF tokenizer.
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary:
            the extra ids are never allowed).
        eos_token_ids: the tokens that end a sequence; one of them may follow a complete
            output.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
        self._compiled: collections.OrderedDict[OutputConstraint, llguidance.LLMatcher] = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(self, constraint: OutputConstraint) -> None:
        """Compiles ``constraint`` (once) so that a request that cannot be served is
        refused before it is queued.

        Raises:
            InvalidRequestError: the schema or expression cannot be compiled or uses
                what cannot be enforced (names ``constraint.param`` and the reason).
        """
        self._template(constraint)

    def matcher(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        """A matcher at the start of ``constraint``'s output (raises as ``check``)."""
        return self._template(constraint).deep_copy()

    def _template(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        with self._lock:
            template = self._compiled.get(constraint)
            if template is not None:
                self._compiled.move_to_end(constraint)
                return template
        template = self._compile(constraint)  # outside the lock: other rows go on meanwhile
        with self._lock:
            self._compiled[constraint] = template
            while len(self._compiled) > COMPILED_GRAMMARS_KEPT:
                self._compiled.popitem(last=False)
        return template

    def _compile(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        what = {"json_schema": "JSON schema", "regex": "regular expression", "lark": "grammar"}[constraint.kind]
        try:
            if constraint.kind == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(constraint.source, defaults=_JSON_DEFAULTS)
            elif constraint.kind == "lark":
                grammar = llguidance.LLMatcher.grammar_from_lark(constraint.source)
            else:
                grammar = llguidance.LLMatcher.grammar_from_regex(constraint.source)
            template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        except Exception as exc:  # noqa: BLE001 - the library's own words are the reason
            raise InvalidRequestError(f"{constraint.param}: this {what} cannot be used: {exc}", constraint.param) from None
        if template.is_error():
            reason = " ".join(line.strip() for line in template.get_error().splitlines() if line.strip())
            if len(reason) > _REASON_CHARS:
                reason = reason[:_REASON_CHARS] + "..."
            raise InvalidRequestError(f"{constraint.param}: this {what} cannot be used: {reason}", constraint.param)
        return template

    def bitmask(self, matchers: Sequence[llguidance.LLMatcher | None]) -> torch.Tensor:
        """The allowed next tokens of each row as an int32 bitmask [rows, words] on the
        CPU; rows without a matcher (or whose matcher has ended) allow every token."""
        words = bitmask_words(self.vocab_size)
        mask = torch.full((len(matchers), words), -1, dtype=torch.int32)
        for row, matcher in enumerate(matchers):
            if matcher is not None and not matcher.is_stopped():
                # What llguidance.torch.fill_next_token_bitmask does, without importing
                # that module (it compiles a torch kernel we do not use at import).
                matcher.unsafe_compute_mask_ptr(mask[row].data_ptr(), words * 4)
        return mask


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def mask_disallowed(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [rows, vocab] with every token whose bit is clear in ``bitmask`` [rows,
    words] (on the logits' device) set to -inf. Tensor operations only, with no host
    synchronisation: it runs inside a captured CUDA graph."""
    rows, vocab = logits.shape
    allowed = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32, device=bitmask.device)) & 1
    return logits.masked_fill(allowed.reshape(rows, -1)[:, :vocab] == 0, float("-inf"))
