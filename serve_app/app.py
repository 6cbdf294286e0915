"""The composition root: the only place deployments are declared and bound.

`serve run configs/serve.yaml` calls `build_app` with the config's `args:` block, which
Serve validates into `AppArgs` because of the annotation. (Hence no
`from __future__ import annotations` here: Serve needs the class, not a string.)
"""

import logging
from typing import Literal

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.model_server import ModelServer
from serve_app.args import Accelerator, AppArgs, ModelArgs
from serve_app.ingress import Ingress

logger = logging.getLogger("ray.serve")

INGRESS_HEADROOM = 64
MODEL_START_ATTEMPTS = 3


def resolve_accelerator(requested: Accelerator, cluster_gpus: float) -> Literal["gpu", "cpu"]:
    """`auto` is `gpu` when the cluster has at least one GPU now, else `cpu`."""
    if requested == "auto":
        return "gpu" if cluster_gpus >= 1 else "cpu"
    return requested


def cluster_gpu_count() -> float:
    """GPUs the connected Ray cluster has (0 when no cluster is connected)."""
    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0))


def model_deployment_options(model: ModelArgs, accelerator: Literal["gpu", "cpu"]) -> dict:
    """`serve.deployment` options of a model deployment."""
    options: dict = {
        "name": model.deployment_name,
        "ray_actor_options": {"num_cpus": model.num_cpus, "num_gpus": 1 if accelerator == "gpu" else 0},
        "max_ongoing_requests": model.replica_max_ongoing_requests,
        # Past this many queued at a caller, Serve refuses at once (the ingress answers 503).
        "max_queued_requests": model.handle_max_queued_requests,
        "graceful_shutdown_timeout_s": model.graceful_shutdown_timeout_s,
        # Loading weights (and preparing the embedded model on a fresh node) takes a while.
        "health_check_timeout_s": 60,
        # A model that cannot load (a wrong path, a missing file) fails the deployment
        # after a few tries with the replica's error in `serve status`, not after 20.
        "max_constructor_retry_count": MODEL_START_ATTEMPTS,
    }
    if model.request_router == "prefix_affinity":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="serve_app.routing:PrefixAffinityRouter",
            request_router_kwargs={"imbalance_requests": model.routing_imbalance_requests},
        )
    if model.autoscaling is not None:
        options["autoscaling_config"] = model.autoscaling.to_serve_config(model.max_batch_size)
    else:
        options["num_replicas"] = model.num_replicas
    return options


def build_app(args: AppArgs) -> Application:
    """Builds the Serve application: one ingress routing to one deployment per model."""
    cluster_gpus = cluster_gpu_count()
    models = {}
    for model in args.models:
        accelerator = resolve_accelerator(model.accelerator, cluster_gpus)
        device = "cuda" if accelerator == "gpu" and model.device == "auto" else "cpu"
        logger.info(
            "model %s: source %s, computing on %s, %s per replica", model.name, model.source, device,
            "one GPU reserved" if accelerator == "gpu" else "no GPU reserved",
        )
        deployment = serve.deployment(ModelServer, **model_deployment_options(model, accelerator))
        models[model.name] = deployment.bind(model.to_model_config(), device)
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="Ingress",
        num_replicas=args.ingress.num_replicas,
        ray_actor_options={"num_cpus": args.ingress.num_cpus},
        # Above the ingress's own limit, so that the excess reaches the ingress and gets
        # its JSON 503 rather than waiting in the proxy's queue.
        max_ongoing_requests=args.ingress.max_ongoing_requests + INGRESS_HEADROOM,
        graceful_shutdown_timeout_s=args.ingress.graceful_shutdown_timeout_s,
    )
    scale_to_zero = frozenset(
        model.name for model in args.models if model.autoscaling is not None and model.autoscaling.min_replicas == 0
    )
    adapters = {model.name: tuple(model.adapters) for model in args.models if model.adapters}
    return ingress.bind(models, args.rate_limits, args.auth, args.ingress, scale_to_zero, adapters)
