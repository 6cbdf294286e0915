"""The rows being decoded (one per returned sequence) and what both decoding strategies
do with them: read each new token, end rows, hand deltas to their requests, and say
which next tokens a row may take (grammars, min_tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from deployments.engine import END_OF_STEPS, PreparedRequest, sequence_seed
from deployments.protocol import FinishReason, SequenceDelta, TokenChoice, TokenLogprobs
from deployments.text_output import SequenceText
from deployments.transformers_engine.grammars import Grammars
from deployments.transformers_engine.prefix_cache import NO_PREFIX
from deployments.transformers_engine.sampling import RowSampling, RowScores


class Admission:
    """A request handed to the scheduler, with the way back to its caller: ``deliver``
    takes a step's deltas, an exception or END_OF_STEPS."""

    def __init__(self, request: PreparedRequest, deliver: Callable[[object], None]) -> None:
        self.request = request
        self.deliver = deliver
        self.adapter_slot = 0  # its LoRA adapter's slot once admitted (0: the base model)
        self.prefix = NO_PREFIX  # what the prefix cache has of its prompt, once looked up
        self.alone = False  # its group's prefill failed: it is prefilled alone, to see whether it is the cause


class Row:
    """One returned sequence (a row of the running batch) and its progress; ``grammar``
    is the matcher of its output constraint, if it has one."""

    def __init__(
        self, admission: Admission, index: int, decode: Callable[[Sequence[int]], str], grammar=None
    ) -> None:
        request = admission.request
        self.admission = admission
        self.index = index
        self.max_new_tokens = request.max_new_tokens
        self.text = SequenceText(decode, request.stop, request.include_stop_str_in_output)
        self.grammar = grammar
        # A grammar must end where it ends: ignore_eos applies to free rows only.
        self.ignore_eos = request.ignore_eos and grammar is None
        self.min_tokens = request.min_tokens
        self.stop_token_ids = frozenset(request.stop_token_ids)
        self.include_stop = request.include_stop_str_in_output
        # Sent with the first delta (sequence 0's): the prompt's scores and how many of
        # its tokens came from the prefix cache.
        self.prompt_logprobs: tuple[TokenLogprobs, ...] = ()
        self.cached_tokens = 0
        self.logprobs = request.logprobs  # None, or how many alternatives to show
        self.token_ids: list[int] = []  # generated so far (the prefix cache keeps them)
        self.finished = False
        self.dropped = False  # ended because its caller left

    @property
    def generated(self) -> int:
        return len(self.token_ids)

    @property
    def sampling(self) -> RowSampling:
        request = self.admission.request
        return RowSampling(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            seed=None if request.seed is None else sequence_seed(request.seed, self.index),
        )

    def advance(
        self, token_id: int, eos_token_ids: frozenset[int], logprobs: TokenLogprobs | None = None
    ) -> SequenceDelta:
        """Takes the next token (and its log probabilities, if asked for); returns its
        delta (text possibly empty). A constrained sequence ends as at EOS once its text
        is complete (nothing but EOS may follow); one of ``stop_token_ids`` ends it as a
        stop string does (its text kept only with include_stop_str_in_output)."""
        self.token_ids.append(token_id)
        finish_reason: FinishReason | None = None
        ends = token_id in eos_token_ids and not self.ignore_eos
        if token_id in self.stop_token_ids and not ends:
            text = self.text.append(token_id) if self.include_stop else ""
            text, finish_reason = text + self.text.finish(), "stop"
        elif ends:
            text, finish_reason = self.text.finish(), "eos"
        else:
            text = self.text.append(token_id)
            if self.grammar is not None:
                self.grammar.consume_token(token_id)
            if self.text.stopped:
                finish_reason = "stop"
            elif self.grammar is not None and self.grammar.is_stopped():
                text += self.text.finish()
                finish_reason = "eos"
            elif self.generated >= self.max_new_tokens:
                text += self.text.finish()
                finish_reason = "length"
        self.finished = finish_reason is not None
        scored = (logprobs,) if logprobs is not None and not ends else ()
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, ()
        cached_tokens, self.cached_tokens = self.cached_tokens, 0
        return SequenceDelta(
            self.index, text, self.generated, finish_reason, scored,
            prompt_logprobs=prompt_logprobs, cached_tokens=cached_tokens,
        )

    @property
    def masked(self) -> bool:
        """Whether its next token is restricted: by a grammar, or (before min_tokens) to
        anything but an end."""
        return self.grammar is not None or self.generated < self.min_tokens


class Delivery:
    """Makes rows for admitted requests and hands their tokens over: what the two
    decoding strategies share, so that neither calls back into the engine."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], grammars: Grammars) -> None:
        self._tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._grammars = grammars
        self._token_texts: dict[int, str] = {}  # each token's text alone (log probabilities)

    def row(self, admission: Admission, index: int) -> Row:
        request = admission.request
        skip = request.skip_special_tokens
        grammar = None if request.constraint is None else self._grammars.matcher(request.constraint)
        return Row(
            admission, index, lambda token_ids: self._tokenizer.decode(token_ids, skip_special_tokens=skip), grammar
        )

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def allowed_tokens(self, rows: Sequence[Row]) -> torch.Tensor | None:
        """The rows' next-token bitmask (grammars.Grammars.bitmask), or None when no
        row is restricted. A row short of its min_tokens may not end: its EOS and stop
        token ids are cleared."""
        if not any(row.masked for row in rows):
            return None
        mask = self._grammars.bitmask([row.grammar for row in rows])
        for position, row in enumerate(rows):
            if row.generated < row.min_tokens:
                ends = row.stop_token_ids if row.ignore_eos else self.eos_token_ids | row.stop_token_ids
                for token_id in ends:
                    bit = token_id % 32  # int32 words: bit 31 is the sign
                    mask[position, token_id // 32] &= ~(1 << bit) if bit < 31 else 0x7FFFFFFF
        return mask

    @staticmethod
    def wants_scores(rows: Sequence[Row]) -> bool:
        """Whether a row asked for log probabilities."""
        return any(row.logprobs is not None for row in rows)

    def _logprobs(self, row: Row, position: int, token_id: int, scores: RowScores | None) -> TokenLogprobs | None:
        if row.logprobs is None or scores is None:
            return None
        top = zip(scores.top_ids[position][: row.logprobs], scores.top[position][: row.logprobs], strict=True)
        return TokenLogprobs(
            TokenChoice(token_id, self.token_text(token_id), scores.chosen[position]),
            tuple(TokenChoice(other, self.token_text(other), logprob) for other, logprob in top),
        )

    def deliver(self, rows: Sequence[Row], token_ids: Sequence[int], scores: RowScores | None = None) -> list[int]:
        """Hands each row's new token (and its log probabilities, when its request asked
        and ``scores`` has them) to its request; returns the positions of the rows still
        running. Rows already finished (a slot step decoded them once more before the
        host saw them end) are skipped; rows whose caller left end, their request told
        once."""
        per_request: dict[int, tuple[Admission, list[SequenceDelta]]] = {}
        dropped: dict[int, Admission] = {}
        still_running = []
        for position, (row, token_id) in enumerate(zip(rows, token_ids, strict=True)):
            if row.finished:
                continue
            admission = row.admission
            if admission.request.cancelled.is_set():
                row.finished = row.dropped = True
                dropped[id(admission)] = admission
                continue
            delta = row.advance(token_id, self.eos_token_ids, self._logprobs(row, position, token_id, scores))
            per_request.setdefault(id(admission), (admission, []))[1].append(delta)
            if not row.finished:
                still_running.append(position)
        for admission in dropped.values():
            admission.deliver(END_OF_STEPS)
        for admission, deltas in per_request.values():
            admission.deliver(deltas)
        return still_running
