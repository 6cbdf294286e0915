"""The application's arguments: the `args:` block of a Serve config, validated by Serve
against `AppArgs` because the builder is typed."""

from __future__ import annotations

import re
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Literal

from limits import parse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.config import ModelConfig
from serve_app.rate_limit import Quota

Accelerator = Literal["auto", "gpu", "cpu"]


AutoscalingPolicyName = Literal["generation", "ongoing_requests"]
# The generation policy, as Serve's controller imports it (`ongoing_requests` is Serve's
# default policy, which needs no path).
GENERATION_POLICY = "deployments.autoscaling:GenerationLoadPolicy"
# Default targets of the generation policy, per batch row (bench/autoscaling.py: on a
# bursty mixed load these kept a replica through a short flood it could absorb and added
# one for long work; a full batch and 256 tokens per row scaled and flapped like Serve's
# own policy at a full batch).
DEFAULT_SEQUENCES_PER_ROW = 2
DEFAULT_BACKLOG_TOKENS_PER_ROW = 128


class AutoscalingArgs(BaseModel):
    """Serve autoscaling for a model deployment (becomes Serve's autoscaling_config)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(
        default=1,
        ge=0,
        description=(
            "Fewest replicas kept running; 0 lets an idle model scale to zero (the first "
            "request after that waits for a replica to start, up to its deadline)."
        ),
    )
    max_replicas: int = Field(default=1, ge=1, description="Most replicas Serve may start.")
    initial_replicas: int | None = Field(
        default=None, ge=0, description="Replicas at deploy time; unset means min_replicas."
    )
    policy: AutoscalingPolicyName = Field(
        default="generation",
        description=(
            "`generation`: scale on what each replica reports it holds, sequences (running "
            "plus waiting) against target_sequences and token backlog (prompt tokens to "
            "prefill plus new tokens owed) against target_token_backlog. `ongoing_requests`: "
            "Serve's default policy, requests in flight against target_ongoing_requests."
        ),
    )
    target_sequences: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Sequences (running plus waiting) per replica the generation policy aims for; "
            f"unset means {DEFAULT_SEQUENCES_PER_ROW} x max_batch_size (a batch running, one waiting)."
        ),
    )
    target_token_backlog: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Tokens owed per replica (prompt tokens to prefill plus new tokens still to "
            f"generate) the generation policy aims for; unset means max_batch_size x "
            f"{DEFAULT_BACKLOG_TOKENS_PER_ROW}."
        ),
    )
    target_ongoing_requests: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Requests in flight per replica the ongoing_requests policy aims for; unset "
            "means max_batch_size."
        ),
    )
    metrics_interval_s: float = Field(
        default=10,
        gt=0,
        description=(
            "How often replicas and callers report their load to Serve's controller; no "
            "decision reacts faster. (Serve 2.60 reads it here; it plans to move it to "
            "environment variables.)"
        ),
    )
    look_back_period_s: float = Field(
        default=30,
        gt=0,
        description="Window over which the reported load is averaged for each decision; longer than metrics_interval_s.",
    )
    upscale_delay_s: float = Field(
        default=10, ge=0, description="How long load must stay high before scaling up."
    )
    downscale_delay_s: float = Field(
        default=60, ge=0, description="How long load must stay low before scaling down."
    )
    downscale_to_zero_delay_s: float | None = Field(
        default=None,
        ge=0,
        description="How long load must stay nil before the last replica goes (min_replicas 0); unset means downscale_delay_s.",
    )

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas "
                f"({self.max_replicas}); raise max_replicas or lower min_replicas"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        return self

    @model_validator(mode="after")
    def _targets_match_the_policy(self) -> "AutoscalingArgs":
        if self.policy == "generation" and self.target_ongoing_requests is not None:
            raise ValueError(
                "target_ongoing_requests applies to policy: ongoing_requests; the generation "
                "policy aims for target_sequences and target_token_backlog. Set policy: "
                "ongoing_requests, or replace target_ongoing_requests with target_sequences"
            )
        if self.policy == "ongoing_requests" and (
            self.target_sequences is not None or self.target_token_backlog is not None
        ):
            raise ValueError(
                "target_sequences and target_token_backlog apply to policy: generation; "
                "remove them or set policy: generation"
            )
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(
                f"look_back_period_s ({self.look_back_period_s}) must exceed metrics_interval_s "
                f"({self.metrics_interval_s}), or a window may hold no report; raise the one or lower the other"
            )
        if self.downscale_to_zero_delay_s is not None and self.min_replicas > 0:
            raise ValueError("downscale_to_zero_delay_s applies only with min_replicas: 0")
        return self

    def to_serve_config(self, max_batch_size: int) -> dict:
        """Serve's autoscaling_config; targets left unset follow the batch size."""
        config = self.model_dump(
            include={
                "min_replicas", "max_replicas", "initial_replicas", "look_back_period_s",
                "upscale_delay_s", "downscale_delay_s", "downscale_to_zero_delay_s",
            },
            exclude_none=True,
        )
        if "metrics_interval_s" in self.model_fields_set:  # else Serve warns it is deprecated
            config["metrics_interval_s"] = self.metrics_interval_s
        if self.policy == "ongoing_requests":
            config["target_ongoing_requests"] = self.target_ongoing_requests or max_batch_size
            return config
        target_sequences = self.target_sequences or DEFAULT_SEQUENCES_PER_ROW * max_batch_size
        # Serve records this target as a gauge whatever the policy; the sequence target
        # is the generation policy's counterpart of it.
        config["target_ongoing_requests"] = target_sequences
        config["policy"] = {
            "policy_function": GENERATION_POLICY,
            "policy_kwargs": {
                "target_sequences": target_sequences,
                "target_token_backlog": self.target_token_backlog
                or max_batch_size * DEFAULT_BACKLOG_TOKENS_PER_ROW,
            },
        }
        return config


class ModelArgs(ModelConfig):
    """One model deployment: the model (ModelConfig) plus how Serve places and scales it."""

    accelerator: Accelerator = Field(
        default="auto",
        description=(
            "What each replica reserves from Ray's scheduler: `gpu` one GPU (num_gpus: 1), "
            "`cpu` none, `auto` gpu when the cluster has a GPU at deploy time (on clusters "
            "that add GPU nodes on demand, say `gpu`). `device` says where it computes."
        ),
    )
    device: Literal["auto", "cpu"] = Field(
        default="auto",
        description=(
            "Where a replica computes: `auto` on the GPU it reserves (see accelerator), else "
            "on the CPU; `cpu` always on the CPU, even when it reserves a GPU. That keeps "
            "one replica per GPU node on clusters whose nodes advertise GPUs they cannot "
            "use for this (CPU-only staging clusters, the simulated cluster of "
            "bench/simulated_cluster.py)."
        ),
    )
    num_cpus: float = Field(
        default=1, ge=0, description="Logical CPUs reserved per replica (Ray resource)."
    )
    num_replicas: int | None = Field(
        default=None, ge=1, description="A fixed replica count; exclusive with `autoscaling`."
    )
    autoscaling: AutoscalingArgs | None = Field(
        default_factory=AutoscalingArgs,
        description="Autoscaling bounds and target; set to null to use num_replicas.",
    )
    max_ongoing_requests: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests one replica accepts at once; unset means 2 x max_batch_size, so "
            "requests wait in the replica to join the batch as rows free up."
        ),
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests each ingress replica queues for this model when every replica is "
            "full; more get a fast 503 with Retry-After. Unset means max_ongoing_requests."
        ),
    )
    graceful_shutdown_timeout_s: float = Field(
        default=60,
        ge=0,
        description="On shutdown or scale-down, how long a replica may finish in-flight generations.",
    )
    request_router: Literal["prefix_affinity", "power_of_two"] = Field(
        default="prefix_affinity",
        description=(
            "How the ingress picks a replica for a request: `prefix_affinity` sends requests that "
            "start alike (every turn of a conversation) to the same replica, whose prefix cache holds "
            "their prefix, unless it is much busier than another (serve_app/routing.py); "
            "`power_of_two`: Serve's default, the less loaded of two at random."
        ),
    )
    routing_imbalance_requests: int = Field(
        default=8,
        ge=0,
        description=(
            "With prefix_affinity: how many more requests than the least loaded replica a "
            "replica may hold and still get the requests of its prefixes."
        ),
    )

    @model_validator(mode="after")
    def _replicas_and_batching_agree(self) -> "ModelArgs":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError(
                "num_replicas and autoscaling are exclusive; set autoscaling: null to use a "
                "fixed num_replicas, or remove num_replicas"
            )
        if self.num_replicas is None and self.autoscaling is None:
            raise ValueError("set num_replicas or autoscaling for the model deployment")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                f"({self.max_batch_size}), so batches could never fill; raise "
                "max_ongoing_requests or lower max_batch_size"
            )
        return self

    @property
    def replica_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def handle_max_queued_requests(self) -> int:
        return self.max_queued_requests or self.replica_max_ongoing_requests

    @property
    def deployment_name(self) -> str:
        """Serve deployment name for this model (names allow fewer characters than models)."""
        return "Model-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    def to_model_config(self) -> ModelConfig:
        """The part the replica needs: the model, without placement and scaling."""
        return ModelConfig(**self.model_dump(include=set(ModelConfig.model_fields)))


class IngressArgs(BaseModel):
    """The HTTP ingress deployment (FastAPI; light, no torch)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(default=0.25, ge=0, description="Logical CPUs per ingress replica.")
    max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        description=(
            "Requests one ingress replica works on at once; more get a fast 503 with "
            "Retry-After. (Serve's default of 5 would cap the whole service, since each "
            "request waits here while the model decodes.)"
        ),
    )
    request_timeout_s: float = Field(
        default=120,
        gt=0,
        description="Deadline of a request without X-Request-Timeout; past it, 504 and the generation stops.",
    )
    max_request_timeout_s: float = Field(
        default=600, gt=0, description="Ceiling on the X-Request-Timeout a client may ask for."
    )
    max_request_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body; larger gets 413."
    )
    body_read_timeout_s: float = Field(
        default=30,
        gt=0,
        le=600,
        description=(
            "Longest a client may take to send its request body; slower gets 408 (a client "
            "trickling bytes would otherwise hold one of the ingress's request slots)."
        ),
    )
    max_prompt_chars: int = Field(
        default=200_000,
        ge=1,
        description="Longest prompt (all chat messages together) in characters; longer gets 422.",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30,
        ge=0,
        description="On shutdown or scale-down, how long a replica may finish in-flight requests.",
    )

    @model_validator(mode="after")
    def _timeout_within_ceiling(self) -> "IngressArgs":
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError(
                f"request_timeout_s ({self.request_timeout_s}) exceeds max_request_timeout_s "
                f"({self.max_request_timeout_s}); lower the one or raise the other"
            )
        return self


def check_rate_limit(text: str) -> str:
    """Validates one limit in the `limits` notation (``10/minute``, ``100 per hour``)."""
    try:
        parse(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a rate limit; write it like 10/minute, 100/hour or 5/second"
        ) from None
    return text


class QuotaArgs(BaseModel):
    """What one client may spend. Limits use the `limits` notation: `10/minute`."""

    model_config = ConfigDict(extra="forbid")

    requests: list[str] = Field(
        default_factory=lambda: ["10/minute"],
        description="Request limits; all apply (e.g. [60/minute, 1000/hour]); [] for none.",
    )
    tokens: list[str] = Field(
        default_factory=list,
        description=(
            "Token quotas: prompt + completion tokens per window (e.g. [20000/minute]), "
            "charged when a request finishes; a request is refused once a window is spent."
        ),
    )

    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description=(
            "The client's share of a model replica's batch: when clients wait for rows, rows go "
            "to them in proportion to their weights (by tokens); a client alone gets them all."
        ),
    )

    @field_validator("requests", "tokens")
    @classmethod
    def _limits_parse(cls, values: list[str]) -> list[str]:
        return [check_rate_limit(value) for value in values]

    def to_quota(self) -> Quota:
        return Quota(requests=tuple(self.requests), tokens=tuple(self.tokens), weight=self.weight)


class RateLimitArgs(BaseModel):
    """Cluster-wide rate limits and token quotas, per API key or client address."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Apply limits at all.")
    default: QuotaArgs = Field(
        default_factory=QuotaArgs,
        description=(
            "Quota of every client without one of its own (clients by address when keys are "
            "off). TEXTGEN_RATE_LIMIT (e.g. `10/minute`, `off`) overrides its `requests`."
        ),
    )
    keys: dict[str, QuotaArgs] = Field(
        default_factory=dict, description="Quota per API key name (needs auth.enabled)."
    )
    models: dict[str, QuotaArgs] = Field(
        default_factory=dict,
        description=(
            "Quota per served model or LoRA adapter (`<model>:<adapter>`): each client's requests "
            "to it count against this quota, kept per client and model, as well as the client's own "
            "(a request is admitted only when both allow it)."
        ),
    )
    storage: str = Field(
        default="ray",
        pattern=r"^(ray|rediss?://.+)$",
        description=(
            "Where counters live: `ray` (a named actor in the cluster; nothing to run) or a "
            "Redis URL (`redis://host:6379/0`) shared by every replica."
        ),
    )
    strategy: Literal["moving-window", "sliding-window-counter", "fixed-window"] = Field(
        default="moving-window",
        description="Window algorithm of request limits (token quotas use fixed windows).",
    )
    fail_open: bool = Field(
        default=True,
        description="When the store is unreachable, let requests through (else answer 503).",
    )
    timeout_s: float = Field(
        default=0.5, gt=0, le=10, description="Longest wait for the store before failing open/closed."
    )
    trusted_proxies: list[IPv4Network | IPv6Network] = Field(
        default_factory=list,
        description=(
            "Networks of proxies whose X-Forwarded-For is believed (e.g. [10.0.0.0/8]); "
            "from anyone else the header is ignored."
        ),
    )
    invalid_request_limit: str = Field(
        default="60/minute",
        description=(
            "Requests refused before they are counted (a 4xx such as 422, 404, 405, 408, 413 "
            "or 415) each client may send before its requests get 429, counted in each "
            "ingress replica's memory: a flood of bad requests never reaches the shared store."
        ),
    )
    max_concurrent_per_client: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests one client may have in flight at once on each ingress replica (the "
            "next gets 429 until one ends); unset means no limit. Counted in each "
            "replica's memory, without a store round trip: with N ingress replicas a "
            "client may have up to N times this many."
        ),
    )

    @field_validator("invalid_request_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        return check_rate_limit(value)


class AuthArgs(BaseModel):
    """API keys (`Authorization: Bearer <key>` or `X-API-Key`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Require an API key (401 without).")
    keys_file: Path | None = Field(
        default=None,
        description=(
            "File of `name:key` or `name:sha256:<hex>` lines; TEXTGEN_API_KEYS and "
            "TEXTGEN_API_KEYS_FILE add keys from the environment."
        ),
    )
    unauthenticated_limit: str = Field(
        default="60/minute",
        description=(
            "Requests without a valid key each client address may send (401 each) before "
            "getting 429, counted in each ingress replica's memory: a flood of keyless "
            "requests never reaches the shared rate-limit store."
        ),
    )

    @field_validator("unauthenticated_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        return check_rate_limit(value)


class AppArgs(BaseModel):
    """Arguments of `serve_app.app:build_app`."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelArgs] = Field(
        default_factory=lambda: [ModelArgs()],
        min_length=1,
        description="Served models; the first is the default when a request names none.",
    )
    ingress: IngressArgs = Field(default_factory=IngressArgs, description="The HTTP ingress.")
    rate_limits: RateLimitArgs = Field(
        default_factory=RateLimitArgs, description="Rate limits and token quotas."
    )
    auth: AuthArgs = Field(default_factory=AuthArgs, description="API keys.")

    @model_validator(mode="after")
    def _model_names_are_unique(self) -> "AppArgs":
        for attribute in ("name", "deployment_name"):
            values = [getattr(model, attribute) for model in self.models]
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise ValueError(
                    f"models need distinct names; {', '.join(duplicates)} appears more than "
                    "once (names that differ only in punctuation collide as deployment names)"
                )
        return self

    @model_validator(mode="after")
    def _model_quotas_name_served_models(self) -> "AppArgs":
        served = {model.name for model in self.models}
        served |= {f"{model.name}:{adapter}" for model in self.models for adapter in model.adapters}
        unknown = sorted(set(self.rate_limits.models) - served)
        if unknown:
            raise ValueError(
                f"rate_limits.models names what is not served: {', '.join(unknown)}; name a model or "
                f"<model>:<adapter> (served: {', '.join(sorted(served))})"
            )
        return self

    @model_validator(mode="after")
    def _key_quotas_need_keys(self) -> "AppArgs":
        if self.rate_limits.keys and not self.auth.enabled:
            raise ValueError(
                "rate_limits.keys sets quotas per API key, but auth.enabled is false; "
                "enable auth or remove rate_limits.keys"
            )
        return self
