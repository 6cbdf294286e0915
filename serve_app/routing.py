"""Prefix-aware routing across model replicas: requests that start the same way go to
the same replica, whose prefix cache then holds their shared prefix.

Each request gets a routing key from the start of its prompt: for chat, the messages up
to and including the first user message (so every turn of a conversation, and every
step of an agent loop, has the key of its first turn); for a plain prompt, its first
PROMPT_KEY_CHARS characters (or PROMPT_KEY_TOKENS token ids). Replicas are ranked for a
key by rendezvous hashing (highest random weight): every ingress replica ranks alike
without sharing any state, and when a replica comes or goes only the keys it held move.
The key's first replica gets the request unless it holds ``imbalance_requests`` more
requests than the least loaded candidate; then the least loaded wins (load from Serve's
queue-length cache). LoRA adapters keep Serve's multiplexed routing: the replicas that
hold the adapter are the candidates, ranked the same way.

Ray Serve LLM's `PrefixCacheAffinityRouter` keeps a character prefix tree in a shared
actor, queried on every request; bench/prefix_cache.py --serve compares the two with
Serve's default power-of-two router.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments.protocol import GenerationParams

PROMPT_KEY_CHARS = 1024
PROMPT_KEY_TOKENS = 256
DEFAULT_IMBALANCE_REQUESTS = 8


def routing_key(params: object) -> bytes | None:
    """What identifies the prefix a request shares with others; None for a call that
    carries no prompt (tokenizing, status)."""
    if not isinstance(params, GenerationParams):
        return None
    if params.messages:
        first_user = next((at for at, message in enumerate(params.messages) if message.role == "user"), 0)
        opening = params.messages[: first_user + 1]
        text = "\x1e".join(f"{message.role}\x1f{message.content}" for message in opening)
        return b"messages\x1d" + text.encode()
    if params.prompt_token_ids is not None:
        return b"tokens\x1d" + b",".join(str(token).encode() for token in params.prompt_token_ids[:PROMPT_KEY_TOKENS])
    return b"prompt\x1d" + params.prompt[:PROMPT_KEY_CHARS].encode()


def rendezvous_ranking(key: bytes, replica_ids: Sequence[str]) -> list[str]:
    """``replica_ids`` from the key's first choice to its last (the same order in every
    process: a keyed hash, not Python's salted one)."""

    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(key, key=replica_id.encode()[:64], digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def choose(ranking: list[str], loads: dict[str, int | None], imbalance_requests: int) -> list[str]:
    """The replicas to try, in order: the key's first choice, unless its load (requests
    it holds; None: unknown) exceeds the least loaded known one's by more than
    ``imbalance_requests``, in which case the candidates go least loaded first."""
    known = {replica: load for replica, load in loads.items() if load is not None}
    first = ranking[0]
    if first in known and known[first] - min(known.values()) > imbalance_requests:
        return sorted(ranking, key=lambda replica: (known.get(replica, 0), ranking.index(replica)))
    return ranking


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """A Serve request router (`request_router_config`) sending requests that share a
    prefix to one replica; see the module's docstring."""

    def initialize_state(self, imbalance_requests: int = DEFAULT_IMBALANCE_REQUESTS) -> None:
        self._imbalance_requests = imbalance_requests

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            candidate_ids: set[ReplicaID] = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            candidate_ids = self.apply_locality_routing(pending_request=pending_request)
        if not candidate_ids:
            return []
        by_name = {replica_id.unique_id: replica_id for replica_id in candidate_ids}
        key = routing_key(pending_request.args[0]) if pending_request is not None and pending_request.args else None
        if key is None:  # no prompt: two at random, the less loaded wins (Serve's default)
            names = random.sample(list(by_name), min(2, len(by_name)))
            return [[self._replicas[by_name[name]] for name in names]]
        ranking = rendezvous_ranking(key, list(by_name))
        loads = {name: self.replica_queue_len_cache.get(by_name[name]) for name in ranking}
        order = choose(ranking, loads, self._imbalance_requests)
        # One replica per rank: the base router probes the first, and moves to the next
        # rank only if it refuses (full).
        return [[self._replicas[by_name[name]]] for name in order]
