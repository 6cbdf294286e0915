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


def rayservice_containers() -> list[tuple[dict, dict]]:
    """(pod spec, container) of every Ray container of the RayService."""
    cluster = load("deploy/kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [(t["spec"], c) for t in templates for c in t["spec"]["containers"]]


def test_rayservice_probes_ask_each_pods_own_proxy_and_leave_model_readiness_to_the_rayservice():
    """Liveness through the API (`/healthz`) reached an ingress replica on any pod, so a
    slow one restarted the head (and its GCS); readiness on `/readyz` took the head out
    of its Service while a model loaded anywhere."""
    for _, container in rayservice_containers():
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/-/healthz", "port": 8000}, (container["name"], probe)
        assert "readinessProbe" not in container, "KubeRay's own readiness (raylet, GCS, the proxy)"
    text = (ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text()
    assert "/readyz" not in text and "path: /healthz" not in text


def test_cluster_yaml_turns_rays_token_auth_on_and_keeps_the_dashboard_local():
    config = load("cluster.yaml")
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=disabled" not in (ROOT / "cluster.yaml").read_text()
    assert commands.count("RAY_AUTH_MODE=token") == 2, "every node starts Ray with token auth"
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"], "and every process in the container"
    assert "--dashboard-host=127.0.0.1" in commands and "0.0.0.0" not in commands
    # The token comes from the operator's machine, outside the repository.
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_cluster_yaml_never_syncs_secrets_to_the_nodes():
    config = load("cluster.yaml")
    excluded = config["rsync_exclude"]
    for pattern in ("**/api-keys*", "**/.git", "**/auth_token", "**/*.key"):
        assert pattern in excluded
    assert ".gitignore" in config["rsync_filter"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in ("api-keys*", ".git", ".venv", "**/auth_token"):
        assert entry in ignored, f"{entry} must stay out of the image"


def test_rayservice_turns_token_auth_on_and_never_off():
    rayservice = load("deploy/kuberay/rayservice.yaml")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    for _, container in rayservice_containers():
        assert {"name": "RAY_AUTH_MODE", "value": "disabled"} not in container.get("env", [])
    assert "disabled" not in (ROOT / "deploy/kuberay/rayservice.yaml").read_text()


def test_rayservice_pods_run_unprivileged_with_a_model_cache():
    for pod, container in rayservice_containers():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert {"name": "HF_HOME", "value": mounts["model-cache"] + "/huggingface"} in container["env"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        claim = load("deploy/kuberay/model-cache-pvc.yaml")["metadata"]["name"]
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == claim


def test_network_policy_admits_the_api_metrics_and_operator_only():
    policy = load("deploy/kuberay/networkpolicy.yaml")
    cluster = load("deploy/kuberay/rayservice.yaml")["spec"]["rayClusterConfig"]
    labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    for group in cluster["workerGroupSpecs"]:
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= group["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    open_to_all = [rule for rule in rules if "from" not in rule]
    assert [port["port"] for rule in open_to_all for port in rule["ports"]] == [8000], "only the API is public"
    restricted = {port["port"]: rule["from"] for rule in rules if "from" in rule for port in rule.get("ports", [])}
    assert set(restricted) == {8080, 8265, 52365}
    assert restricted[8265][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    [same_cluster] = [rule for rule in rules if "from" in rule and "ports" not in rule]
    assert same_cluster["from"] == [{"podSelector": policy["spec"]["podSelector"]}]
