"""The app's metrics, defined once, recorded inside the replicas through
`ray.util.metrics`. Ray's metrics agent exports each as ``ray_<name>`` (counters gain
``_total``); Prometheus scrapes the agent, never the ingress.

Each metric object is created on first use in the process that records it, and Ray is
imported only then: an engine process hands its calls to its replica (record_elsewhere)
and never loads Ray (0.4 s and 44 MiB at every replica start).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.util import metrics

    from deployments.autoscaling import GenerationLoadReport

# From a cached 5 ms answer to a long generation on a busy CPU.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL_LOAD_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class _Unrecorded:
    """Stands in for every metric where Ray is not installed: the engine and its
    benchmarks run on machines with only torch (a bare GPU box), and record nothing."""

    def inc(self, *args, **kwargs) -> None:
        pass

    observe = set = inc


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **options):
    """A `ray.util.metrics` metric of ``kind`` (Counter, Histogram, Gauge), or one that
    records nothing where Ray is not installed."""
    try:
        from ray.util import metrics
    except ImportError:
        return _Unrecorded()
    return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **options)


@functools.cache
def _counter(name: str, description: str, tag_keys: tuple[str, ...]) -> metrics.Counter:
    return _metric("Counter", name, description, tag_keys)


@functools.cache
def _histogram(
    name: str, description: str, boundaries: tuple[float, ...], tag_keys: tuple[str, ...]
) -> metrics.Histogram:
    return _metric("Histogram", name, description, tag_keys, boundaries=list(boundaries))


@functools.cache
def _gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> metrics.Gauge:
    return _metric("Gauge", name, description, tag_keys)


# The ingress side.


def record_request(route: str, status_code: int, model: str, latency_s: float) -> None:
    """A finished HTTP request: ``textgen_requests_total`` and ``textgen_request_latency_seconds``."""
    tags = {"route": route, "status_code": str(status_code), "model": model}
    _counter(
        "textgen_requests", "HTTP requests by route, status code and model.", ("route", "status_code", "model")
    ).inc(tags=tags)
    _histogram(
        "textgen_request_latency_seconds",
        "Time from the ingress receiving a request to its last byte.",
        LATENCY_BUCKETS_S,
        ("route", "model"),
    ).observe(latency_s, tags={"route": route, "model": model})


def record_rate_limited(route: str) -> None:
    """A request refused with 429 (``textgen_rate_limited_total``)."""
    _counter("textgen_rate_limited", "Requests refused by the rate limiter.", ("route",)).inc(
        tags={"route": route}
    )


def record_rate_limiter_error(backend: str) -> None:
    """The limiter's store could not be reached (``textgen_rate_limiter_errors_total``)."""
    _counter(
        "textgen_rate_limiter_errors",
        "Rate-limit checks that failed because the store was unreachable.",
        ("backend",),
    ).inc(tags={"backend": backend})


# The model side.


def record_prompt_tokens(model: str, tokens: int) -> None:
    """Prompt tokens of a request entering a batch (``textgen_prompt_tokens_total``)."""
    _counter("textgen_prompt_tokens", "Prompt tokens processed.", ("model",)).inc(tokens, tags={"model": model})


def record_completion_tokens(model: str, tokens: int) -> None:
    """Tokens generated, counted as each step produces them, so the counter stops growing
    as soon as a generation stops (``textgen_completion_tokens_total``)."""
    _counter("textgen_completion_tokens", "Tokens generated.", ("model",)).inc(tokens, tags={"model": model})


def tenant_label(tenant: str) -> str:
    """The tenant as a metric label: its identity (``key:<name>``, never the key, or
    ``ip:<address>``) for the first `TENANT_LABELS` tenants a process sees, then
    ``other``, so that clients with many addresses cannot grow the series without
    bound; ``none`` for a request sent without one."""
    if not tenant:
        return "none"
    if tenant in _tenant_labels or len(_tenant_labels) < TENANT_LABELS:
        _tenant_labels.add(tenant)
        return tenant
    _other_seen.add("other")
    return "other"


TENANT_LABELS = 32
_tenant_labels: set[str] = set()
_other_seen: set[str] = set()  # {"other"} once a tenant past the first TENANT_LABELS came


def record_tenant_completion_tokens(model: str, tenant: str, tokens: int) -> None:
    """Tokens generated for a tenant (``textgen_tenant_completion_tokens_total``): who
    holds the batch, and the shares fair scheduling gives."""
    _counter(
        "textgen_tenant_completion_tokens", "Tokens generated, by tenant.", ("model", "tenant")
    ).inc(tokens, tags={"model": model, "tenant": tenant_label(tenant)})


def record_tenant_sequences(model: str, by_tenant: dict[str, tuple[int, int]]) -> None:
    """Each tenant's sequences in a replica, running and waiting for a row
    (``textgen_tenant_sequences{state}``, a gauge per replica: sum by model, tenant);
    ``by_tenant`` maps a tenant to (running, waiting). Every tenant labelled so far is
    recorded, as 0 when it holds none, so that its series stays (at most
    `TENANT_LABELS` + 1 of them)."""
    gauge = _gauge(
        "textgen_tenant_sequences", "Sequences a model replica holds for a tenant, running or waiting for a row.",
        ("model", "tenant", "state"),
    )
    labelled: dict[str, list[int]] = {label: [0, 0] for label in _tenant_labels | _other_seen}
    for tenant, (running, waiting) in by_tenant.items():
        counts = labelled.setdefault(tenant_label(tenant), [0, 0])
        counts[0] += running
        counts[1] += waiting
    for label, (running, waiting) in labelled.items():
        gauge.set(running, tags={"model": model, "tenant": label, "state": "running"})
        gauge.set(waiting, tags={"model": model, "tenant": label, "state": "waiting"})


def record_queue_time(model: str, seconds: float) -> None:
    """From a request's arrival at a model replica to its batch starting."""
    _histogram(
        "textgen_queue_time_seconds",
        "Time a request waits in a model replica before its batch starts.",
        LATENCY_BUCKETS_S,
        ("model",),
    ).observe(seconds, tags={"model": model})


def record_time_to_first_token(model: str, seconds: float) -> None:
    """From a request's arrival at a model replica to its first generated text."""
    _histogram(
        "textgen_time_to_first_token_seconds",
        "Time from a request reaching a model replica to its first token.",
        LATENCY_BUCKETS_S,
        ("model",),
    ).observe(seconds, tags={"model": model})


def record_batch_size(model: str, sequences: int) -> None:
    """Sequences decoded together, observed at every decode step (rows join and leave
    between steps)."""
    _histogram(
        "textgen_batch_size", "Sequences per decode batch.", BATCH_SIZE_BUCKETS, ("model",)
    ).observe(sequences, tags={"model": model})


def record_prefix_cache_lookup(model: str, prompt_tokens: int, hit_tokens: int) -> None:
    """A prompt looked up in the prefix cache: ``textgen_prefix_cache_lookups_total``,
    ``textgen_prefix_cache_queried_tokens_total`` (its tokens) and
    ``textgen_prefix_cache_hit_tokens_total`` (those not prefilled again); hit rate =
    hit / queried."""
    tags = {"model": model}
    _counter("textgen_prefix_cache_lookups", "Prompts looked up in the prefix cache.", ("model",)).inc(tags=tags)
    _counter(
        "textgen_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.", ("model",)
    ).inc(prompt_tokens, tags=tags)
    if hit_tokens:
        _counter(
            "textgen_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache.", ("model",)
        ).inc(hit_tokens, tags=tags)


def record_prefix_cache_bytes(model: str, cached_bytes: int) -> None:
    """What a replica's prefix cache holds (``textgen_prefix_cache_bytes``, a gauge per
    replica: sum by model)."""
    _gauge("textgen_prefix_cache_bytes", "Bytes of KV held by a model replica's prefix cache.", ("model",)).set(
        cached_bytes, tags={"model": model}
    )


def record_model_load(model: str, seconds: float) -> None:
    """How long a replica took to load its model (``textgen_model_load_seconds``); a
    histogram, one observation per replica start (a gauge set once would expire)."""
    _histogram(
        "textgen_model_load_seconds",
        "Seconds a replica took to load its model.",
        MODEL_LOAD_BUCKETS_S,
        ("model",),
    ).observe(seconds, tags={"model": model})


def record_generation_load(model: str, report: GenerationLoadReport) -> None:
    """What one replica holds, as the generation autoscaling policy sees it:
    ``textgen_sequences{state=running|waiting}`` and ``textgen_token_backlog`` (prompt
    tokens to prefill plus new tokens owed). Gauges per replica: sum them by model."""
    sequences = _gauge(
        "textgen_sequences", "Sequences a model replica holds, running or waiting for a batch row.",
        ("model", "state"),
    )
    sequences.set(report.running_sequences, tags={"model": model, "state": "running"})
    sequences.set(report.waiting_sequences, tags={"model": model, "state": "waiting"})
    _gauge(
        "textgen_token_backlog",
        "Tokens a model replica owes: prompt tokens to prefill plus new tokens still to generate.",
        ("model",),
    ).set(report.token_backlog, tags={"model": model})


# Every recorder above; an engine process hands its calls to its replica.
_RECORDERS = frozenset(name for name in globals() if name.startswith("record_"))


def record_elsewhere(send: Callable[[str, tuple], None]) -> None:
    """Makes this process's ``record_*`` calls go to ``send(name, args)`` instead of Ray:
    an engine process is no Ray worker, so its replica records them (`record_by_name`)."""
    for name in _RECORDERS:
        globals()[name] = lambda *args, name=name: send(name, args)


def record_by_name(name: str, args: tuple) -> None:
    """Records what another process passed to ``record_<...>(*args)`` (see record_elsewhere)."""
    if name not in _RECORDERS:
        raise ValueError(f"no metric recorder named {name!r}")
    globals()[name](*args)
