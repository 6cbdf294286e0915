"""App args, every config file, and how the builder turns args into deployments."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from serve_app.app import build_app, model_deployment_options, resolve_accelerator
from serve_app.args import (
    AppArgs,
    AuthArgs,
    AutoscalingArgs,
    IngressArgs,
    ModelArgs,
    QuotaArgs,
    RateLimitArgs,
)
from serve_app.rate_limit import STRATEGIES

CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("serve*.yaml"))
LOCAL_CONFIG = Path(__file__).parents[2] / "configs" / "serve.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_files_validate_with_serve_and_our_args(path):
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for application in config.applications:
        assert application.import_path == "serve_app.app:build_app"
        AppArgs.model_validate(application.args)


def test_local_config_serves_the_embedded_model_on_loopback():
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    args = AppArgs.model_validate(config["applications"][0]["args"])
    model = args.models[0]
    assert model.source == "embedded" and model.accelerator == "auto"
    assert model.autoscaling is not None, "autoscaled: a bigger node only raises max_replicas"
    # Logical CPUs at full scale stay within a 2-core node (over-commit hangs forever).
    at_full_scale = args.ingress.num_replicas * args.ingress.num_cpus + sum(
        m.autoscaling.max_replicas * m.num_cpus for m in args.models
    )
    assert at_full_scale <= 2


def test_defaults_are_one_embedded_model():
    args = AppArgs()
    assert [m.name for m in args.models] == ["smollm2-135m-instruct"]
    assert args.models[0].replica_max_ongoing_requests == 2 * args.models[0].max_batch_size


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_replicas": 2}, "num_replicas and autoscaling are exclusive"),
        ({"autoscaling": None}, "set num_replicas or autoscaling"),
        ({"max_batch_size": 32, "max_ongoing_requests": 8}, "batches could never fill"),
        ({"revision": "main"}, "revision applies to hub ids only"),
        ({"accelerator": "tpu"}, "'auto', 'gpu' or 'cpu'"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
        ({"engine": "not a path"}, "String should match pattern"),
        ({"adapters": {"a:b": "/adapters/a"}}, "String should match pattern"),
        ({"max_adapters": 0}, "greater than or equal to 1"),
    ],
)
def test_model_args_rules_say_how_to_fix(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelArgs(**fields)


def test_autoscaling_bounds_are_checked():
    with pytest.raises(ValidationError, match="raise max_replicas or lower min_replicas"):
        AutoscalingArgs(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="initial_replicas"):
        AutoscalingArgs(min_replicas=1, max_replicas=2, initial_replicas=5)


def test_model_names_must_be_distinct():
    with pytest.raises(ValidationError, match="distinct names"):
        AppArgs(models=[ModelArgs(name="a"), ModelArgs(name="a")])
    with pytest.raises(ValidationError, match="collide as deployment names"):
        AppArgs(models=[ModelArgs(name="a/b"), ModelArgs(name="a:b")])


@pytest.mark.parametrize(
    "requested, gpus, expected",
    [("auto", 0, "cpu"), ("auto", 1, "gpu"), ("auto", 8, "gpu"), ("gpu", 0, "gpu"), ("cpu", 4, "cpu")],
)
def test_accelerator_resolution(requested, gpus, expected):
    assert resolve_accelerator(requested, gpus) == expected


def test_gpu_replicas_request_one_gpu_each():
    model = ModelArgs(accelerator="gpu", num_cpus=2)
    options = model_deployment_options(model, "gpu")
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert model_deployment_options(model, "cpu")["ray_actor_options"]["num_gpus"] == 0


def test_deployment_options_carry_scaling_and_concurrency():
    autoscaled = model_deployment_options(
        ModelArgs(max_batch_size=8, autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=3)), "cpu"
    )
    assert autoscaled["autoscaling_config"]["max_replicas"] == 3
    assert autoscaled["max_ongoing_requests"] == 16
    fixed = model_deployment_options(ModelArgs(num_replicas=2, autoscaling=None), "cpu")
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed


def test_model_replicas_are_chosen_by_prefix_unless_serves_default_is_asked_for():
    router = model_deployment_options(ModelArgs(routing_imbalance_requests=3), "cpu")["request_router_config"]
    assert router.request_router_class == "serve_app.routing:PrefixAffinityRouter"
    assert router.request_router_kwargs == {"imbalance_requests": 3}
    assert "request_router_config" not in model_deployment_options(ModelArgs(request_router="power_of_two"), "cpu")
    with pytest.raises(ValidationError, match="request_router"):
        ModelArgs(request_router="round_robin")


def test_builder_binds_one_deployment_per_model_behind_the_ingress():
    on_demand = ModelArgs(name="b/c", autoscaling=AutoscalingArgs(min_replicas=0, max_replicas=2),
                          adapters={"tuned": "/adapters/tuned"})
    app = build_app(AppArgs(models=[ModelArgs(name="a"), on_demand]))
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    models, rate_limits, auth, limits, scale_to_zero, adapters = ingress.init_args
    assert adapters == {"b/c": ("tuned",)}, "the ingress knows each model's adapters"
    assert limits.max_ongoing_requests == 256
    assert rate_limits.default.requests == ["10/minute"] and not auth.enabled
    assert scale_to_zero == {"b/c"}, "readiness must not wake a model scaled to zero"
    assert list(models) == ["a", "b/c"]
    assert [bound._bound_deployment.name for bound in models.values()] == ["Model-a", "Model-b-c"]
    config, device = models["a"]._bound_deployment.init_args
    assert device == "cpu" and config.name == "a" and not hasattr(config, "accelerator")


def test_a_replica_can_reserve_a_gpu_and_compute_on_the_cpu():
    staged = ModelArgs(name="staged", accelerator="gpu", device="cpu")
    app = build_app(AppArgs(models=[staged, ModelArgs(name="real", accelerator="gpu")]))
    models = app._bound_deployment.init_args[0]
    staged_model, real_model = models["staged"]._bound_deployment, models["real"]._bound_deployment
    assert staged_model.ray_actor_options["num_gpus"] == 1 and staged_model.init_args[1] == "cpu"
    assert real_model.ray_actor_options["num_gpus"] == 1 and real_model.init_args[1] == "cuda"
    with pytest.raises(ValidationError, match="'auto' or 'cpu'"):
        ModelArgs(device="cuda")


def test_generation_policy_is_the_default_with_targets_from_the_batch_size():
    config = model_deployment_options(ModelArgs(max_batch_size=8), "cpu")["autoscaling_config"]
    assert config["policy"] == {
        "policy_function": "deployments.autoscaling:GenerationLoadPolicy",
        "policy_kwargs": {"target_sequences": 2 * 8, "target_token_backlog": 8 * 128},
    }
    explicit = AutoscalingArgs(
        target_sequences=4, target_token_backlog=1000, metrics_interval_s=1, look_back_period_s=5
    )
    config = explicit.to_serve_config(max_batch_size=8)
    assert config["policy"]["policy_kwargs"] == {"target_sequences": 4, "target_token_backlog": 1000}
    assert (config["metrics_interval_s"], config["look_back_period_s"]) == (1, 5)
    # Serve validates the result, and imports the policy from its path.
    AutoscalingConfig(**config)


def test_serves_own_policy_stays_available():
    config = AutoscalingArgs(policy="ongoing_requests", target_ongoing_requests=5).to_serve_config(8)
    assert "policy" not in config and config["target_ongoing_requests"] == 5
    assert AutoscalingConfig(**config).policy.is_default_policy_function()
    assert AutoscalingArgs(policy="ongoing_requests").to_serve_config(8)["target_ongoing_requests"] == 8


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"target_ongoing_requests": 8}, "Set policy: ongoing_requests"),
        ({"policy": "ongoing_requests", "target_token_backlog": 100}, "remove them or set policy: generation"),
        ({"downscale_to_zero_delay_s": 5}, "only with min_replicas: 0"),
        ({"look_back_period_s": 5}, "must exceed metrics_interval_s"),
        ({"policy": "latency"}, "'generation' or 'ongoing_requests'"),
    ],
)
def test_autoscaling_targets_must_match_the_policy(fields, message):
    with pytest.raises(ValidationError, match=message):
        AutoscalingArgs(**fields)


@pytest.mark.parametrize(
    "args_class", [ModelArgs, AutoscalingArgs, IngressArgs, RateLimitArgs, AuthArgs, QuotaArgs]
)
def test_readme_documents_every_arg(args_class):
    readme = Path(__file__).parents[2].joinpath("README.md").read_text()
    for field in args_class.model_fields:
        assert f"| `{field}` |" in readme, f"README's config reference lacks {field}"


def test_rate_limit_args_validate_limits_and_storage():
    with pytest.raises(ValidationError, match="not a rate limit; write it like 10/minute"):
        QuotaArgs(requests=["lots"])
    with pytest.raises(ValidationError, match="String should match pattern"):
        RateLimitArgs(storage="memcached://x")
    assert RateLimitArgs(storage="redis://127.0.0.1:6379/0").storage.startswith("redis")
    with pytest.raises(ValidationError, match="auth.enabled is false"):
        AppArgs(rate_limits=RateLimitArgs(keys={"alice": QuotaArgs()}))


def test_every_strategy_name_has_an_implementation():
    names = RateLimitArgs.model_fields["strategy"].annotation.__args__
    assert set(names) == set(STRATEGIES)


def test_local_config_limits_ten_a_minute_across_two_ingress_replicas():
    args = AppArgs.model_validate(yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"])
    assert args.ingress.num_replicas == 2
    assert args.rate_limits.enabled and args.rate_limits.default.requests == ["10/minute"]
    assert args.rate_limits.storage == "ray" and not args.auth.enabled


def test_model_quotas_name_served_models_or_adapters():
    models = [ModelArgs(name="m", adapters={"tuned": "/adapters/tuned"})]
    AppArgs(models=models, rate_limits=RateLimitArgs(models={"m": QuotaArgs(), "m:tuned": QuotaArgs()}))
    with pytest.raises(ValidationError, match="rate_limits.models names what is not served: m:other"):
        AppArgs(models=models, rate_limits=RateLimitArgs(models={"m:other": QuotaArgs()}))
