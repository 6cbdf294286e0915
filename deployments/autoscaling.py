"""Autoscaling on what limits generation: the load each model replica reports, and the
Serve autoscaling policy that turns it into a replica count.

Serve's default policy counts requests in flight per replica, and a replica with 40
short requests looks the same to it as one with 40 long ones. A model replica instead
reports the sequences it holds (running plus waiting for a batch row) and its token
backlog: the prompt tokens it has still to prefill plus the new tokens it still owes.
`GenerationLoadPolicy` asks for enough replicas that neither exceeds its per-replica
target.

The policy runs in Serve's controller, which cloudpickles this module by value: it
imports nothing of the project's, so the controller needs nothing installed for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The names replicas report them under (ModelServer.record_autoscaling_stats).
SEQUENCES = "sequences"
TOKEN_BACKLOG = "token_backlog"


@dataclasses.dataclass(frozen=True)
class GenerationLoadReport:
    """What one replica holds at a moment."""

    running_sequences: int
    waiting_sequences: int
    token_backlog: int

    def as_stats(self) -> dict[str, float]:
        """The custom autoscaling metrics Serve records for the policy."""
        return {
            SEQUENCES: float(self.running_sequences + self.waiting_sequences),
            TOKEN_BACKLOG: float(self.token_backlog),
        }


class GenerationLoadPolicy:
    """Serve autoscaling policy (``AutoscalingConfig.policy``, a class with
    ``policy_kwargs``): the replicas needed to keep every replica within both targets.

    desired = max(sequences / target_sequences, token backlog / target_token_backlog)

    Both sums run over the running replicas' reports, averaged by Serve over
    ``look_back_period_s``; requests queued at callers because every replica was full
    count as one sequence each (their size is unknown until a replica tokenizes them).
    Serve then applies the bounds, the up/downscale delays and the scaling factors, and
    starts a deployment scaled to zero at once when a request arrives.

    Args:
        target_sequences: sequences (running + waiting) per replica, e.g. its batch size.
        target_token_backlog: prompt tokens to prefill + new tokens owed per replica.
    """

    def __init__(self, target_sequences: float, target_token_backlog: float) -> None:
        if target_sequences <= 0 or target_token_backlog <= 0:
            raise ValueError("target_sequences and target_token_backlog must be positive")
        self.target_sequences = target_sequences
        self.target_token_backlog = target_token_backlog

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        """``ctx`` is Serve's AutoscalingContext; returns (replicas wanted, policy state)."""
        if ctx.current_num_replicas == 0:
            # Starting up, or scaled to zero with nothing waiting (Serve itself starts a
            # replica as soon as a request is queued): keep the current target.
            return ctx.target_num_replicas, {}
        reported = ctx.aggregated_metrics or {}
        sequences = reported.get(SEQUENCES, {})
        if not sequences:
            # No replica has reported yet: requests in flight are the best estimate.
            return ctx.total_num_requests / self.target_sequences, {}
        queued = ctx.total_queued_requests or 0.0
        total_sequences = sum(sequences.values()) + queued
        total_backlog = sum(reported.get(TOKEN_BACKLOG, {}).values())
        wanted = max(total_sequences / self.target_sequences, total_backlog / self.target_token_backlog)
        return wanted, {}
