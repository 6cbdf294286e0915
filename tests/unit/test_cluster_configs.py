"""The GPU cluster path: cluster.yaml with Ray's own validation, the GPU Serve config and
the KubeRay RayService carrying it."""

import copy
from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from serve_app.app import model_deployment_options, resolve_accelerator
from serve_app.args import AppArgs

ROOT = Path(__file__).parents[2]


def load(relative: str) -> dict:
    return yaml.safe_load((ROOT / relative).read_text())


def test_cluster_yaml_passes_rays_validation():
    config = load("cluster.yaml")
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)
    assert config["idle_timeout_minutes"] > 0


def test_cluster_node_types_put_gpus_where_model_replicas_need_them():
    config = load("cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head holds no model replica"
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "model replicas ask for num_gpus: 1; some worker type must have a GPU"
    for node_type in gpu_types:
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    args = AppArgs.model_validate(load("configs/serve.gpu.yaml")["applications"][0]["args"])
    for model in args.models:
        needed = model_deployment_options(model, resolve_accelerator(model.accelerator, 0))["ray_actor_options"]
        assert needed["num_gpus"] == 1
        assert any(t["resources"]["CPU"] >= needed["num_cpus"] for t in gpu_types)


def test_cluster_image_is_pinned_to_the_projects_ray():
    image = load("cluster.yaml")["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-") and image.endswith("-gpu")
    rayservice = load("deploy/kuberay/rayservice.yaml")
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert f"FROM rayproject/ray:{ray.__version__}-" in (ROOT / "deploy" / "Dockerfile").read_text()


def test_no_secrets_in_cluster_configs():
    for relative in ("cluster.yaml", "configs/serve.gpu.yaml", "deploy/kuberay/rayservice.yaml"):
        text = (ROOT / relative).read_text()
        assert "TEXTGEN_API_KEYS=" not in text and "aws_secret" not in text.lower(), relative


def test_gpu_serve_config_validates_and_asks_for_gpus_in_bfloat16():
    config = load("configs/serve.gpu.yaml")
    ServeDeploySchema.model_validate(config)
    assert config["proxy_location"] == "EveryNode"
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert args.auth.enabled and args.rate_limits.enabled
    for model in args.models:
        assert model.accelerator == "gpu" and model.dtype == "bfloat16"
        assert model.autoscaling.max_replicas > model.autoscaling.min_replicas >= 1


def test_rayservice_carries_the_gpu_serve_config_verbatim():
    rayservice = load("deploy/kuberay/rayservice.yaml")
    carried = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert carried == load("configs/serve.gpu.yaml")
    ServeDeploySchema.model_validate(carried)


def test_rayservice_gpu_workers_request_gpus_and_the_head_none():
    cluster = load("deploy/kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    [gpu_group] = cluster["workerGroupSpecs"]
    [container] = gpu_group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    head_image = head["template"]["spec"]["containers"][0]["image"]
    assert container["image"] == head_image
