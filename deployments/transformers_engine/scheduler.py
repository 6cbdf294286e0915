"""Continuous batching: the scheduler thread that owns the model.

Between two decode steps it admits waiting requests (prefilled in groups of similar
prompt length, a chunk per step), joins their KV cache to the running rows, and drops
finished or cancelled rows, so a short request never waits for a long one and a new
request never waits for a batch to drain (iteration-level batching, as in Orca, vLLM and
TGI). How the running rows are decoded is the `Decoding`'s business.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

import torch

from deployments.engine import END_OF_STEPS, PreparedRequest, merge_steps
from deployments.protocol import AdapterLoadError, SequenceDelta
from deployments import metrics
from deployments.transformers_engine import kv_cache
from deployments.transformers_engine.decoding import Decoding, LoadedModel, Prefilled
from deployments.transformers_engine.fair_queue import FairQueue
from deployments.transformers_engine.prefix_cache import NO_PREFIX, CachedPrefix, PrefixCache
from deployments.transformers_engine.prompt_scores import PromptScores
from deployments.transformers_engine.rows import Admission, Delivery

logger = logging.getLogger("ray.serve")

# Prompt tokens one admission wave may prefill (the first waiting request is always
# admitted).
MAX_PREFILL_TOKENS = 8192
# Prompt tokens (rows x columns) prefilled between two decode steps: long prompts are
# prefilled in chunks, so running rows stall for one chunk at a time, not a whole prompt.
# With no row running, nobody stalls: a group is prefilled whole. On a GPU an eager
# forward pass costs about the same for 1 or 2048 tokens (the host sets the pace).
PREFILL_CHUNK_TOKENS = 256
GPU_PREFILL_CHUNK_TOKENS = 2048
# Prompts prefilled together are left-padded to the longest; a prompt joins a group
# only while the padding stays within this share of the group's real tokens (plus a
# few columns, so that short prompts still share a pass).
PREFILL_PADDING_SHARE = 0.25
PREFILL_PADDING_ALLOWANCE = 16
# Failed scheduler iterations in a row after which the engine reports itself broken.
BROKEN_AFTER_FAILURES = 3
# How often the prefix cache's size gauge is recorded again, idle too: Ray drops a
# gauge's value not recorded within about two metric report intervals.
GAUGE_REFRESH_S = 1.0


def prefill_groups(shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Splits an admission wave into groups prefilled together, so that padding wastes
    little: under mixed load, one wave padded to its longest prompt computed 2.4 times
    the real prompt tokens (bench/throughput.py mix). ``shapes``: per prompt, the tokens
    it has from the prefix cache and the tokens left to prefill; a group pads both to
    its widest, so each must stay within the padding share. Returns indices into
    ``shapes``, groups of the shortest first."""

    def padded_within_share(widths: list[int]) -> bool:
        return max(widths) * len(widths) <= sum(widths) * (1 + PREFILL_PADDING_SHARE) + PREFILL_PADDING_ALLOWANCE

    groups: list[list[int]] = []
    for index in sorted(range(len(shapes)), key=shapes.__getitem__):
        group = [*groups[-1], index] if groups else []
        if group and all(padded_within_share([shapes[i][part] for i in group]) for part in (0, 1)):
            groups[-1] = group
        else:
            groups.append([index])
    return groups


class Outbox:
    """Carries a request's steps from the scheduler thread to its caller's event loop,
    at most one hand-over per ``interval_s``, and none while the previous one has not
    been taken yet (its caller is busy): steps meanwhile are merged, so a caller that
    keeps up gets every step as it is made, and a slow one as much as piled up at once.
    The first and any finishing step go at once; an error or a drop flushes what is held.

    Every hand-over wakes the caller's event loop and, in the service, the replica, the
    ingress and the proxy on the way to the client. With the engine inside the replica
    (`engine_process: false`) that Python work also holds the scheduler's GIL: at 16
    streamed clients a decode forward pass took 133 ms there with a hand-over per step,
    120 ms with one per 0.25 s, 106 ms unstreamed, 91-98 ms in a plain process.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, outputs: asyncio.Queue, interval_s: float) -> None:
        self._loop, self._outputs, self._interval_s = loop, outputs, interval_s
        self._held: list[SequenceDelta] | None = None
        self._last_sent: float | None = None
        # Hand-overs sent (counted by the scheduler thread) and put on the queue (by the
        # event loop): each counter has one writer, so no lock is needed.
        self._sent = 0
        self._arrived = 0

    def deliver(self, item: object) -> None:
        """Takes a step's deltas, an exception or END_OF_STEPS (scheduler thread only)."""
        if isinstance(item, list):
            self._held = merge_steps(self._held, item) if self._held else item
            now = time.monotonic()
            due = self._last_sent is None or now - self._last_sent >= self._interval_s
            if (due and not self._in_flight()) or any(delta.finish_reason is not None for delta in item):
                self._send(self._held)
                self._held, self._last_sent = None, now
            return
        if self._held:
            self._send(self._held)
            self._held = None
        self._send(item)

    def _in_flight(self) -> bool:
        """Whether an earlier hand-over has not reached its caller's queue, or waits
        there unread (reading a deque's length from this thread is safe)."""
        return self._arrived < self._sent or self._outputs.qsize() > 0

    def _send(self, item: object) -> None:
        self._sent += 1
        self._loop.call_soon_threadsafe(self._arrive, item)

    def _arrive(self, item: object) -> None:
        self._arrived += 1
        self._outputs.put_nowait(item)


@dataclasses.dataclass
class _Prefill:
    """Admitted requests whose prompts are being run, a chunk of columns per scheduler
    iteration, before they join the running batch."""

    admitted: list[Admission]
    input_ids: torch.Tensor  # [requests, width]: left-padded, what each prompt has not cached
    # [requests, past + width]: the cached prefixes (ending at column ``past``), then the rest
    attention_mask: torch.Tensor
    position_ids: torch.Tensor  # [requests, width]
    past: int = 0  # columns of cached prefixes, in ``cache`` from the start
    done: int = 0  # columns of input_ids already run
    cache: object = None
    scores: PromptScores | None = None  # when a request asked for prompt log probabilities

    @property
    def finished(self) -> bool:
        return self.done == self.input_ids.shape[1]


class Scheduler:
    """The loop of the scheduler thread: takes arrivals, prefills them, lets
    ``decoding`` step the running rows, and fails the requests of a step that failed.

    Args:
        model: the model, as prefill calls it.
        delivery: makes the rows of prefilled requests.
        decoding: the running rows' strategy.
        joinable: whether prefilled rows can join running ones (else a wave is taken whole).
        slot_for: ``(adapter, in_use) -> slot or None`` when the model has LoRA adapters.
        batch_wait_timeout_s: how long an idle scheduler waits for requests sent together.
        prefix_cache: where prompts find the KV of prefixes already computed, if enabled.
        fair: whether waiting requests are ordered fairly across tenants (`FairQueue`),
            else in one line in arrival order.
        max_rows_per_tenant: most running rows one tenant's requests may hold, if capped.
    """

    def __init__(
        self,
        model: LoadedModel,
        delivery: Delivery,
        decoding: Decoding,
        joinable: bool,
        slot_for: Callable[[str, set], int | None] | None,
        batch_wait_timeout_s: float,
        prefix_cache: PrefixCache | None = None,
        fair: bool = True,
        max_rows_per_tenant: int | None = None,
    ) -> None:
        self._model, self._delivery, self._decoding = model, delivery, decoding
        self._prefix_cache = prefix_cache
        self._joinable, self._slot_for = joinable, slot_for
        self._batch_wait_timeout_s = batch_wait_timeout_s
        self.prefill_chunk_tokens = GPU_PREFILL_CHUNK_TOKENS if model.device == "cuda" else PREFILL_CHUNK_TOKENS
        self._arrivals: queue.SimpleQueue[Admission | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._failures_in_a_row = 0
        self._waiting: FairQueue[Admission] = FairQueue(fair)
        self._max_rows_per_tenant = max_rows_per_tenant
        self.broken: str | None = None  # why the engine can no longer serve
        self.iteration_started: float | None = None  # None while idle
        self._gauges_recorded = 0.0  # when (monotonic)
        self._thread = threading.Thread(target=self._schedule_forever, name="textgen-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, admission: Admission) -> None:
        self._arrivals.put(admission)

    def close(self) -> None:
        """Stops the loop after its current step; requests not finished fail."""
        self._closed.set()
        self._arrivals.put(None)
        self._thread.join()

    def _schedule_forever(self) -> None:
        waiting = self._waiting
        decoding = self._decoding
        prefills: deque[_Prefill] = deque()  # the admitted wave, a group at a time
        while not self._closed.is_set():
            self._record_gauges()
            if not decoding.busy and not prefills and not waiting:
                self.iteration_started = None
                waiting.forget_debts()
                try:  # idle: sleep until a request comes
                    arrival = self._arrivals.get(timeout=GAUGE_REFRESH_S if self._prefix_cache else None)
                except queue.Empty:
                    continue
                if arrival is None:  # close() woke the loop
                    continue
                self._queue(arrival)
                self._collect_arrivals(wait_s=self._batch_wait_timeout_s)
            else:
                self._collect_arrivals(wait_s=0)
            self.iteration_started = time.monotonic()
            prefill_failed = False
            try:
                if not prefills:
                    prefills.extend(self._start_prefills(self._take_admissions()))
                if prefills:
                    try:
                        prefilled = self._prefill_chunk(prefills[0], whole=not decoding.busy)
                    except Exception as exc:  # noqa: BLE001 - the running batch is untouched: isolate
                        prefill_failed = True
                        self._note_failure(exc)
                        self._isolate(prefills.popleft(), exc)
                    else:
                        if prefills[0].finished:
                            if prefilled is not None:  # None: every row ended at its prompt
                                decoding.join(prefilled)
                            prefills.popleft()  # only now: a failed join fails its requests too
                decoding.step()
                if not prefill_failed:
                    self._failures_in_a_row = 0
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving others
                failed = self._admissions_in(prefills)
                logger.exception("decode step failed; failing its %d request(s)", len(failed))
                decoding.clear()
                prefills.clear()
                self._note_failure(exc)
                for admission in failed:
                    admission.deliver(exc)
        closed = RuntimeError("the engine was closed")
        for admission in [*self._admissions_in(prefills), *waiting]:
            admission.deliver(closed)

    def _note_failure(self, exc: Exception) -> None:
        """One bad batch (a request too large for memory) is survivable; every step
        failing (a CUDA error, a corrupted state) is not. Called before the requests
        hear of it: the next health check must see a broken engine."""
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= BROKEN_AFTER_FAILURES and self.broken is None:
            self.broken = f"{self._failures_in_a_row} steps in a row failed, the last with {exc!r}"
            logger.error("engine broken: %s; the health check now fails", self.broken)

    def _isolate(self, prefill: _Prefill, exc: Exception) -> None:
        """A prefill failed; its forward pass touched only its own cache, so the running
        batch goes on. A request that failed alone gets the error; the requests of a
        group go back to the head of the queue, each to be prefilled alone, so that only
        those that fail again hear of it (a prompt too large for memory, an input that
        trips a kernel)."""
        if len(prefill.admitted) == 1:
            [admission] = prefill.admitted
            logger.error("request_id=%s: its prefill failed alone: %r", admission.request.request_id, exc)
            admission.deliver(exc)
            return
        logger.warning("a prefill of %d requests failed (%r); each is retried alone", len(prefill.admitted), exc)
        for admission in prefill.admitted:
            admission.alone = True
        self._waiting.put_back_first([(admission.request.tenant, admission) for admission in prefill.admitted])

    def _record_gauges(self) -> None:
        now = time.monotonic()
        if self._prefix_cache is not None and now - self._gauges_recorded >= GAUGE_REFRESH_S:
            metrics.record_prefix_cache_bytes(self._model.name, self._prefix_cache.bytes)
            self._gauges_recorded = now

    def _admissions_in(self, prefills: deque[_Prefill]) -> list[Admission]:
        """The requests with rows being decoded or prompts in ``prefills``, each once."""
        found = {id(row.admission): row.admission for row in self._decoding.rows() if not row.finished}
        found.update({id(a): a for prefill in prefills for a in prefill.admitted})
        return list(found.values())

    def _collect_arrivals(self, wait_s: float) -> None:
        """Moves new arrivals to ``waiting``; waits up to ``wait_s`` for more to come,
        so that requests sent together are prefilled together."""
        deadline = time.monotonic() + wait_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                arrival = self._arrivals.get(timeout=remaining) if remaining > 0 else self._arrivals.get_nowait()
            except queue.Empty:
                return
            if arrival is not None:  # None: close() woke the loop
                self._queue(arrival)

    def _queue(self, admission: Admission) -> None:
        """Puts an arrival in its tenant's line; its cost, for the tenants' fair shares,
        is its tokens: the prompt and every sequence's new tokens (`FairQueue`)."""
        request = admission.request
        cost = len(request.prompt_token_ids) + request.max_new_tokens * request.num_return_sequences
        self._waiting.push(admission, request.tenant, cost, request.tenant_weight, request.priority)

    def _take_admissions(self) -> list[Admission]:
        """The waiting requests that fit in the free rows now, in the waiting lines'
        order (`FairQueue`: the tenants' fair order, each tenant's by priority and
        arrival); those whose caller left before they started are dropped on the way. A
        request whose adapter finds no slot (every slot holds one that running rows
        use), or that would pad the running batch past its memory (`Decoding.fits`),
        waits, and every request behind it with it. A tenant at `max_rows_per_tenant`
        running rows waits (its line only; a request alone in its tenant always runs).

        A request whose next uncached block a request of this wave computes waits for
        the next wave, when it finds that block in the prefix cache (SGLang's in-batch
        prefix caching): sixteen chats sent at once with one 1,000-token system prompt
        then prefill it once, not sixteen times. It is taken out of line (and its
        tenant charged) and put back first, so that the requests behind it still join
        this wave and it starts the next one."""
        waiting = self._waiting
        admitted: list[Admission] = []
        deferred: list[tuple[str, Admission]] = []
        passed_over: set[str] = set()  # lines that wait for the next wave
        computed_in_wave: set[int] = set()  # the first uncached block of each admitted prompt
        free = self._decoding.free_rows()
        rows_of = self._running_rows_by_tenant() if self._max_rows_per_tenant is not None else None
        prefill_tokens = 0
        wave_rows, wave_width, wave_tokens = 0, 0, 0  # for the running batch's memory (Decoding.fits)
        while (head := waiting.peek(passed_over)) is not None:
            line, admission = head
            request = admission.request
            if request.cancelled.is_set():
                waiting.take(line).deliver(END_OF_STEPS)
                continue
            if admission.alone and admitted:  # a suspect of a failed prefill: a wave of its own
                break
            rows = request.num_return_sequences
            if rows_of is not None and rows_of[request.tenant] and (
                rows_of[request.tenant] + rows > self._max_rows_per_tenant
            ):
                passed_over.add(line)
                continue
            admission.prefix = self._cached_prefix(request)
            next_block = admission.prefix.next_block
            if next_block is not None and next_block in computed_in_wave:
                deferred.append((request.tenant, waiting.take(line)))
                continue
            uncached = len(request.prompt_token_ids) - admission.prefix.tokens  # a row computes only these
            too_many = rows > free
            too_long = admitted and prefill_tokens + uncached > MAX_PREFILL_TOKENS
            length = len(request.prompt_token_ids)
            too_wide = (admitted or self._decoding.busy) and not self._decoding.fits(  # alone, it runs
                wave_rows + rows, max(wave_width, length), wave_tokens + rows * length
            )
            if too_many or too_long or too_wide:
                break
            if request.adapter is not None:
                in_use = {row.admission.request.adapter for row in self._decoding.rows() if not row.finished}
                try:
                    slot = self._slot_for(request.adapter, in_use | {a.request.adapter for a in admitted})
                except AdapterLoadError as exc:  # this request's fault alone: the others go on
                    logger.error("request_id=%s: %s", request.request_id, exc)
                    waiting.take(line).deliver(exc)
                    continue
                if slot is None:
                    break
                admission.adapter_slot = slot
            admitted.append(waiting.take(line))
            if admission.alone:
                break
            free -= rows
            if rows_of is not None:
                rows_of[request.tenant] += rows
            wave_rows, wave_width, wave_tokens = wave_rows + rows, max(wave_width, length), wave_tokens + rows * length
            prefill_tokens += uncached
            if next_block is not None:
                computed_in_wave.add(next_block)
            if self._prefix_cache is not None:
                metrics.record_prefix_cache_lookup(self._model.name, length, admission.prefix.tokens)
        waiting.put_back_first(deferred)
        return admitted

    def _running_rows_by_tenant(self) -> Counter[str]:
        return Counter(row.admission.request.tenant for row in self._decoding.rows() if not row.finished)

    def _cached_prefix(self, request: PreparedRequest) -> CachedPrefix:
        """The prefix cache's longest prefix of the request's prompt; none for a
        request that scores its prompt (every position's logits are computed)."""
        if self._prefix_cache is None or request.prompt_logprobs is not None:
            return NO_PREFIX
        return self._prefix_cache.lookup(request.prompt_token_ids, request.adapter)

    def _start_prefills(self, admitted: list[Admission]) -> list[_Prefill]:
        started = time.monotonic()
        for admission in admitted:
            admission.request.timings.batch_started_at = started
        if not self._joinable:  # groups join the batch one after another: take the wave whole
            return [self._start_prefill(admitted)] if admitted else []
        # Requests that score their prompts are grouped apart: their groups keep every
        # position's logits (prompt_scores), which the others need not pay for.
        prefills = []
        for scoring in (False, True):
            wave = [admission for admission in admitted if (admission.request.prompt_logprobs is not None) == scoring]
            groups = prefill_groups(
                [(a.prefix.tokens, len(a.request.prompt_token_ids) - a.prefix.tokens) for a in wave]
            )
            prefills += [self._start_prefill([wave[index] for index in group]) for group in groups]
        return prefills

    def _start_prefill(self, admitted: list[Admission]) -> _Prefill:
        """The group's prompts, left-padded, after their cached prefixes (themselves
        left-padded to the longest of them, in the cache the prefill starts from)."""
        prompts = [admission.request.prompt_token_ids for admission in admitted]
        cached = [admission.prefix.tokens for admission in admitted]
        past = max(cached)
        width = max(len(prompt) - skip for prompt, skip in zip(prompts, cached, strict=True))
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), past + width, dtype=torch.long)
        position_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, (prompt, skip) in enumerate(zip(prompts, cached, strict=True)):
            rest = len(prompt) - skip
            input_ids[row, width - rest :] = torch.tensor(prompt[skip:], dtype=torch.long)
            attention_mask[row, past - skip : past] = 1
            attention_mask[row, past + width - rest :] = 1
            position_ids[row, width - rest :] = torch.arange(skip, len(prompt))
        device = self._model.device
        input_ids, attention_mask, position_ids = input_ids.to(device), attention_mask.to(device), position_ids.to(device)
        cache = None
        if past:
            cache = kv_cache.of_prefixes([admission.prefix.blocks for admission in admitted], past)
            for admission in admitted:  # copied: the blocks may go when the cache evicts them
                admission.prefix = dataclasses.replace(admission.prefix, blocks=())
        scores = None
        if any(admission.request.prompt_logprobs is not None for admission in admitted):
            scores = PromptScores(
                [admission.request.prompt_logprobs for admission in admitted], prompts, self._delivery.token_text
            )
        return _Prefill(admitted, input_ids, attention_mask, position_ids, past=past, cache=cache, scores=scores)

    @torch.inference_mode()
    def _prefill_chunk(self, prefill: _Prefill, whole: bool = False) -> Prefilled | None:
        """Runs the next chunk of the prompts (``whole``: all that is left; a prefill
        that scores its prompts keeps to chunks of PromptScores.columns); once the
        last column has run, returns their rows (see `_prefilled`)."""
        rows, width = prefill.input_ids.shape
        columns = width - prefill.done
        if not whole:
            columns = min(columns, max(1, self.prefill_chunk_tokens // rows))
        output_layer = self._model.output_layer
        scored_by_head = prefill.scores is not None and output_layer is not None
        if prefill.scores is not None and not scored_by_head:
            columns = min(columns, prefill.scores.columns(rows))  # whole logits: a bounded chunk
        end = prefill.done + columns
        self._model.use_adapters([admission.adapter_slot for admission in prefill.admitted])
        inputs = dict(
            input_ids=prefill.input_ids[:, prefill.done : end],
            attention_mask=prefill.attention_mask[:, : prefill.past + end],
            position_ids=prefill.position_ids[:, prefill.done : end],
        )
        if scored_by_head:  # the backbone's states, the head applied by the scorer in chunks
            output = self._model.forward(prefill.cache, backbone=True, **inputs)
            states = output.last_hidden_state
            prefill.scores.add_chunk(states, prefill.input_ids, prefill.done, output_layer)
            last_logits = output_layer(states[:, -1, :])
        else:
            output = self._model.forward(prefill.cache, **inputs, logits_to_keep=0 if prefill.scores is not None else 1)
            if prefill.scores is not None:
                prefill.scores.add_chunk(output.logits, prefill.input_ids, prefill.done)
            last_logits = output.logits[:, -1, :]
        prefill.cache = self._model.cache_of(output)
        prefill.done = end
        if end < width:
            return None
        return self._prefilled(prefill, last_logits.float())

    def _prefilled(self, prefill: _Prefill, logits: torch.Tensor) -> Prefilled | None:
        """The rows of a prefill whose last chunk has run, one per returned sequence,
        with their first next-token ``logits``. A request that scored its prompt gets
        the scores with its first delta; one that asked for no new token (echo with
        max_new_tokens 0) ends here: None when no row is left."""
        cache, admitted = prefill.cache, prefill.admitted
        if self._prefix_cache is not None:
            self._keep_prompts(prefill)
        rows = []
        for position, admission in enumerate(admitted):
            request = admission.request
            scored = (prefill.scores.of_row(position) if prefill.scores is not None else None) or ()
            # Every sequence echoes the prompt with its scores, so each first delta
            # carries them (one tuple: a step's message pickles it once); the cached
            # tokens are the request's, counted on its first sequence alone.
            if request.max_new_tokens == 0:
                admission.deliver([
                    SequenceDelta(index, "", 0, "length", prompt_logprobs=scored)
                    for index in range(request.num_return_sequences)
                ])
                continue
            for index in range(request.num_return_sequences):
                row = self._delivery.row(admission, index)
                row.prompt_logprobs = scored
                if index == 0:
                    row.cached_tokens = admission.prefix.tokens
                rows.append(row)
        if not rows:
            return None
        # Each prompt was run once; its cache and scores fan out to its rows.
        owner = {id(admission): position for position, admission in enumerate(admitted)}
        sources = [owner[id(row.admission)] for row in rows]
        fan_out = torch.tensor(sources, device=self._model.device)
        if sources != list(range(len(admitted))):
            cache.batch_select_indices(fan_out)
        return Prefilled(
            rows=rows,
            cache=cache,
            attention_mask=prefill.attention_mask[fan_out],
            last_position=prefill.position_ids[fan_out, -1],
            logits=logits[fan_out],
        )

    def _keep_prompts(self, prefill: _Prefill) -> None:
        """Puts the blocks of the group's prompts that the prefix cache lacks into it."""
        for position, admission in enumerate(prefill.admitted):
            self._prefix_cache.store(
                admission.request.prompt_token_ids, admission.request.adapter,
                lambda start, end, row=position: kv_cache.row_history(
                    prefill.cache, prefill.attention_mask, row, start, end
                ),
            )
