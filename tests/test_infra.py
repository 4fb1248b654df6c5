"""The cluster files (infra/, configs/base|large) can be wrong without any cluster to find out: these tests
parse and schema-check them offline, tie them to the code (entrypoints exist, configs load, GPU counts in
the manifests cover what the dry-run plans ask for, the arithmetic in the YAML comments is what the code
computes) and keep secrets out of them."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from packaging.requirements import Requirement

from dalle_core.config import DALLEConfig
from dalle_core.dalle import DALLE
from dalle_core.vae import DiscreteVAE
from pipelines.config import Config, TrainCLIPConfig, TrainConfig, TrainVAEConfig
from pipelines.resources import (
    ACTIVATION_ELEMENTS_PER_DIM,
    JOBS,
    deployment_actor_options,
    encoder_actor_options,
    plan_resources,
    worker_resources,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ROOT = "/app"  # WORKDIR of infra/Dockerfile: where the repo lives inside the image
YAML_FILES = sorted([*ROOT.glob("infra/**/*.yaml"), *ROOT.glob("configs/*.yaml")])
MANIFESTS = sorted(ROOT.glob("infra/kuberay/*.yaml"))
CLUSTER_JOBS = ("train_vae", "pretokenize", "train", "train_clip", "evaluate")
PRESETS = sorted(ROOT.glob("configs/*.yaml"))
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
EFA_RESOURCE = "vpc.amazonaws.com/efa"  # what the AWS EFA Kubernetes device plugin advertises
# EFA network cards per instance type (one EFA interface each): what a node must launch with and a pod ask for.
EFA_CARDS = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16}
# NCCL over EFA: the image's values, which the GPU workers of cluster.yaml and the KubeRay pods repeat.
EFA_ENV = ("FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "FI_EFA_FORK_SAFE", "NCCL_SOCKET_IFNAME")
DLAMI_IMAGE = re.compile(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                         r"base-oss-nvidia-driver-gpu-(ubuntu|amazon-linux)-[\d.]+/latest/ami-id")
LITERAL_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}",
                         re.IGNORECASE)


def load_docs(path: Path) -> list[Any]:
    with open(path) as f:
        return list(yaml.safe_load_all(f))


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in MANIFESTS for doc in load_docs(path) if doc is not None]


# ---------------------------------------------------------------------------------------------------------
# The schema check: the fields KubeRay's ray.io/v1 CRDs require, and the rules of this project.


def _pod_errors(template: Any, where: str, gpu: bool) -> list[str]:
    errors = []
    containers = (template or {}).get("spec", {}).get("containers") if isinstance(template, dict) else None
    if not isinstance(containers, list) or not containers:
        return [f"{where}.template.spec.containers: must be a non-empty list"]
    for i, container in enumerate(containers):
        at = f"{where}.template.spec.containers[{i}]"
        if not isinstance(container, dict) or not container.get("name") or not container.get("image"):
            errors.append(f"{at}: needs a name and an image")
            continue
        for env in container.get("env") or []:
            if env.get("name") in SECRET_ENV and "value" in env:
                errors.append(f"{at}.env.{env['name']}: literal value; use valueFrom.secretKeyRef")
            if env.get("name") in SECRET_ENV and "secretKeyRef" not in (env.get("valueFrom") or {}):
                errors.append(f"{at}.env.{env['name']}: must come from valueFrom.secretKeyRef")
        limits = (container.get("resources") or {}).get("limits") or {}
        if gpu and int(limits.get("nvidia.com/gpu", 0)) < 1:
            errors.append(f"{at}.resources.limits: a GPU group needs nvidia.com/gpu >= 1")
        if gpu and int(limits.get(EFA_RESOURCE, 0)) < 1:
            errors.append(f"{at}.resources.limits: a GPU group needs {EFA_RESOURCE} >= 1 (NCCL over EFA, not TCP)")
    return errors


def _cluster_spec_errors(spec: Any, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: must be a mapping"]
    errors = []
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        errors.append(f"{where}.headGroupSpec: required")
    else:
        if not isinstance(head.get("rayStartParams"), dict):
            errors.append(f"{where}.headGroupSpec.rayStartParams: required mapping")
        errors += _pod_errors(head.get("template"), f"{where}.headGroupSpec", gpu=False)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return errors + [f"{where}.workerGroupSpecs: required non-empty list"]
    for i, group in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        if not group.get("groupName"):
            errors.append(f"{at}.groupName: required")
        if not isinstance(group.get("rayStartParams"), dict):
            errors.append(f"{at}.rayStartParams: required mapping")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) for c in counts) or not counts[0] <= counts[1] <= counts[2]:
            errors.append(f"{at}: needs integers minReplicas <= replicas <= maxReplicas, got {counts}")
        gpu_group = "gpu" in str(group.get("groupName", ""))
        errors += _pod_errors(group.get("template"), at, gpu=gpu_group)
    return errors


def kuberay_errors(doc: Any) -> list[str]:
    """Everything wrong with one manifest document; empty when it would be accepted and is safe."""
    if not isinstance(doc, dict):
        return ["document: must be a mapping"]
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: expected ray.io/v1, got {doc.get('apiVersion')!r}")
    if not (doc.get("metadata") or {}).get("name"):
        errors.append("metadata.name: required")
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "RayCluster":
        errors += _cluster_spec_errors(spec, "spec")
    elif kind == "RayJob":
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            errors.append("spec.entrypoint: required string")
        if "runtimeEnvYAML" in spec and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
            errors.append("spec.runtimeEnvYAML: must be a YAML mapping")
        if "submitterPodTemplate" in spec:
            errors += _pod_errors(spec["submitterPodTemplate"], "spec.submitterPodTemplate", gpu=False)
        errors += _cluster_spec_errors(spec.get("rayClusterSpec"), "spec.rayClusterSpec")
    else:
        errors.append(f"kind: expected RayCluster or RayJob, got {kind!r}")
    return errors


def entrypoint_job_and_config(entrypoint: str) -> tuple[str, str]:
    """``python /app/jobs/X.py --config /app/configs/Y.yaml`` -> repo-relative script and config paths."""
    args = shlex.split(entrypoint)
    script = next(a for a in args if a.endswith(".py"))
    config = args[args.index("--config") + 1]
    return tuple(str(Path(p).relative_to(IMAGE_ROOT)) if p.startswith(IMAGE_ROOT) else p for p in (script, config))


def gpu_capacity(cluster_spec: dict[str, Any], count: str = "replicas") -> int:
    """GPUs the worker groups bring at their configured replica count (``count="maxReplicas"``: scaled out)."""
    total = 0
    for group in cluster_spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            total += group[count] * int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    return total


def cpu_capacity(cluster_spec: dict[str, Any], count: str = "replicas") -> float:
    """CPUs the worker groups bring (the head schedules nothing)."""
    return sum(g[count] * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in cluster_spec["workerGroupSpecs"])


def dry_run_main() -> Any:
    """``jobs/dry_run.py``'s ``main``, loaded in this process (a subprocess costs a torch import)."""
    spec = importlib.util.spec_from_file_location("dry_run", ROOT / "jobs/dry_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def dockerfile_args() -> dict[str, str]:
    """``ARG NAME=default`` of infra/Dockerfile (quotes stripped)."""
    text = (ROOT / "infra/Dockerfile").read_text()
    return {k: v.strip('"') for k, v in re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE)}


def dockerfile_env() -> dict[str, str]:
    """The variables the image's ``ENV`` instructions set (continuation lines joined), last one wins."""
    text = (ROOT / "infra/Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in re.findall(r"^ENV (.+)$", text, re.MULTILINE):
        env.update(item.split("=", 1) for item in shlex.split(line))
    return env


def makefile_torch_pins() -> tuple[str, str]:
    """The torch and torchvision versions the Makefile installs (the build CI tests)."""
    text = (ROOT / "Makefile").read_text()
    return re.search(r"pip install -q torch==(\S+) torchvision==(\S+)$", text, re.MULTILINE).groups()


def cluster_node_types() -> dict[str, dict[str, Any]]:
    return load_docs(ROOT / "infra/cluster.yaml")[0]["available_node_types"]


def gpu_worker_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every container of every GPU worker group in infra/kuberay."""
    found = []
    for path, doc in manifests():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        for group in spec["workerGroupSpecs"]:
            if "gpu" in group["groupName"]:
                pod = group["template"]["spec"]
                found += [(f"{path.name}:{group['groupName']}", pod, c) for c in pod["containers"]]
    return found


# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_runs() -> dict[str, dict[str, Any]]:
    """``jobs/dry_run.py`` for each cluster job on large.yaml, as a user runs it: run side by side."""
    procs = {
        job: subprocess.Popen([sys.executable, "jobs/dry_run.py", "--job", job, "--config", "configs/large.yaml"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for job in CLUSTER_JOBS
    }
    plans = {}
    for job, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"dry_run --job {job} failed: {err[-2000:]}"
        plans[job] = json.loads(out)
    return plans


def test_every_yaml_parses() -> None:
    assert len(YAML_FILES) >= 8, YAML_FILES
    for path in YAML_FILES:
        docs = load_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs if d is not None), path


def test_kuberay_manifests_pass_the_schema_check() -> None:
    kinds = [doc["kind"] for _, doc in manifests()]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == len(CLUSTER_JOBS), kinds
    for path, doc in manifests():
        assert kuberay_errors(doc) == [], path


def test_schema_check_catches_broken_manifests() -> None:
    job = next(doc for _, doc in manifests() if doc["kind"] == "RayJob")
    broken = copy.deepcopy(job)
    del broken["spec"]["entrypoint"]
    worker = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    del worker["resources"]["limits"]["nvidia.com/gpu"]
    worker["resources"]["limits"].pop(EFA_RESOURCE, None)
    worker["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]
    del broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    broken["apiVersion"] = "ray.io/v1alpha1"
    errors = "\n".join(kuberay_errors(broken))
    for needle in ("apiVersion", "spec.entrypoint", "nvidia.com/gpu", "literal value", "headGroupSpec.rayStartParams",
                   EFA_RESOURCE):
        assert needle in errors, (needle, errors)


def test_no_literal_credentials_anywhere_in_infra_or_configs() -> None:
    files = [p for p in [*ROOT.glob("infra/**/*"), *ROOT.glob("configs/*")] if p.is_file()]
    assert any(p.name == "Dockerfile" for p in files)
    for path in files:
        assert not LITERAL_KEY.search(path.read_text()), f"{path}: looks like a literal AWS key"
    for path, doc in manifests():
        text = yaml.safe_dump(doc)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert name in text, f"{path}: pods get no {name} from the Secret"


def test_manifest_entrypoints_and_configs_exist_in_the_repo_and_the_image() -> None:
    dockerfile = (ROOT / "infra/Dockerfile").read_text()
    copied = set(re.findall(r"^COPY\s+(\S+)", dockerfile, re.MULTILINE))
    seen = set()
    for path, doc in manifests():
        if doc["kind"] != "RayJob":
            continue
        script, config = entrypoint_job_and_config(doc["spec"]["entrypoint"])
        seen.add(Path(script).stem)
        for rel in (script, config):
            assert (ROOT / rel).is_file(), f"{path}: entrypoint names {rel}, missing from the repo"
            assert f"{Path(rel).parts[0]}/" in copied, f"{path}: {rel} is not copied into the image"
        Config.load(ROOT / config)
    assert seen == set(CLUSTER_JOBS)


def test_every_image_reference_is_the_one_image_with_the_pinned_ray() -> None:
    dockerfile = (ROOT / "infra/Dockerfile").read_text()
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", dockerfile).group(1)
    images = {load_docs(ROOT / "infra/cluster.yaml")[0]["docker"]["image"]}
    for path, doc in manifests():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray_version, path
        images |= set(re.findall(r"image: (\S+)", yaml.safe_dump(doc)))
    assert len(images) == 1, images


def test_dockerfile_installs_like_the_makefile() -> None:
    text = (ROOT / "infra/Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.MULTILINE)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-devel-", text, re.MULTILINE), "DeepSpeed ops need nvcc"
    torch_version = re.search(r"ARG TORCH_VERSION=(\S+)", text).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_req = Requirement(re.search(r'"(torch[<>=!~][^"]*)"', pyproject).group(1))
    assert torch_req.specifier.contains(torch_version), (torch_req, torch_version)
    order = [text.index(s) for s in ("cython", "torch==${TORCH_VERSION}", "--no-build-isolation youtokentome",
                                     "DS_BUILD_FUSED_ADAM=1", "pip install \"ray")]
    assert order == sorted(order), "install order: cython, torch, youtokentome, deepspeed ops, project"


def test_dockerfile_installs_the_makefiles_torch_build_from_the_matching_cuda_index() -> None:
    """One torch everywhere: the Makefile's pins, from the index of the base image's CUDA, which is the CUDA of the
    wheel the Makefile gets from PyPI (the build CI runs)."""
    args = dockerfile_args()
    torch_pin, vision_pin = makefile_torch_pins()
    assert (args["TORCH_VERSION"], args["TORCHVISION_VERSION"]) == (torch_pin, vision_pin), "Dockerfile != Makefile"
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", args["TORCH_INDEX"])
    assert index, args["TORCH_INDEX"]
    major, minor = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*devel-\S+", args["CUDA_IMAGE"]).groups()
    assert index.group(1) == major + minor, f"torch from cu{index.group(1)} on a CUDA {major}.{minor} base image"
    assert int(major) >= 12, "H100 (sm_90) needs CUDA 12 or newer"
    text = (ROOT / "infra/Dockerfile").read_text()
    assert "torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION} --index-url ${TORCH_INDEX}" in text
    image = load_docs(ROOT / "infra/cluster.yaml")[0]["docker"]["image"]
    assert image.endswith(f"-cu{index.group(1)}"), f"{image}: the tag names another CUDA than the image has"
    if torch.__version__.split("+")[0] == torch_pin and torch.version.cuda:  # this venv is the Makefile's
        assert torch.version.cuda.replace(".", "") == index.group(1), (
            f"the Makefile's torch {torch.__version__} is CUDA {torch.version.cuda}, the image's cu{index.group(1)}")


def test_image_brings_efa_and_the_aws_ofi_nccl_plugin() -> None:
    text = (ROOT / "infra/Dockerfile").read_text()
    install = re.search(r"efa_installer\.sh (.+?)(\\|&&|$)", text, re.MULTILINE)
    assert install, "the EFA installer is not run"
    assert {"-y", "--skip-kmod", "--skip-limit-conf", "--no-verify"} <= set(install.group(1).split()), install.group(1)
    assert re.search(r"aws-efa-installer-\$\{EFA_INSTALLER_VERSION\}", text)
    assert re.fullmatch(r"\d+\.\d+\.\d+", dockerfile_args()["EFA_INSTALLER_VERSION"]), "pin the EFA installer"
    env = dockerfile_env()
    library_path = env["LD_LIBRARY_PATH"].split(":")
    assert "/opt/amazon/efa/lib" in library_path, "libfabric not on LD_LIBRARY_PATH"
    assert any(p.startswith("/opt/amazon/ofi-nccl/lib") for p in library_path), "NCCL would not find aws-ofi-nccl"
    assert library_path[-1] == "${LD_LIBRARY_PATH}", "the base image's CUDA library path must stay on it"
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1", env
    assert set(EFA_ENV) <= set(env), set(EFA_ENV) - set(env)


def test_every_node_type_boots_an_explicit_dlami_in_the_pinned_region() -> None:
    """Left out, ImageId is Ray's default AMI (CUDA 11.2, a driver too old for H100s and for the image's CUDA)."""
    config = load_docs(ROOT / "infra/cluster.yaml")[0]
    assert re.fullmatch(r"[a-z]{2}-[a-z]+-\d", config["provider"]["region"]), "AMI ids are per region: pin it"
    for name, node_type in cluster_node_types().items():
        image = str(node_type["node_config"].get("ImageId", ""))
        assert DLAMI_IMAGE.fullmatch(image), f"{name}: ImageId {image!r} is not an explicit DLAMI"
    text = (ROOT / "infra/cluster.yaml").read_text()
    assert "aws ssm get-parameter" in text and "aws ec2 describe-images" in text, "say how to look the AMI up"


def test_gpu_node_types_launch_every_efa_interface_in_a_placement_group() -> None:
    config = load_docs(ROOT / "infra/cluster.yaml")[0]
    gpu_types = {k: v for k, v in cluster_node_types().items() if k != config["head_node_type"]}
    assert gpu_types
    for name, node_type in gpu_types.items():
        node = node_type["node_config"]
        cards = EFA_CARDS.get(node["InstanceType"])
        assert cards, f"{name}: {node['InstanceType']} is not an EFA GPU instance type ({sorted(EFA_CARDS)})"
        interfaces = node.get("NetworkInterfaces") or []
        assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(cards)), f"{name}: one EFA per card"
        assert all(i["InterfaceType"] in ("efa", "efa-only") for i in interfaces), name
        primary = next(i for i in interfaces if i["NetworkCardIndex"] == 0)
        assert (primary["DeviceIndex"], primary["InterfaceType"]) == (0, "efa"), f"{name}: card 0 must be EFA+ENA"
        # Ray's rule: with NetworkInterfaces, subnet and security groups live on each interface only.
        assert all(i.get("SubnetId") and i.get("Groups") for i in interfaces), name
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(node), name
        assert node.get("Placement", {}).get("GroupName"), f"{name}: no cluster placement group"
    options = " ".join(config["docker"]["worker_run_options"])
    assert "--device=/dev/infiniband" in options and "memlock=-1:-1" in options, options


def test_nccl_over_efa_env_is_the_images_on_every_gpu_worker() -> None:
    image_env = {k: dockerfile_env().get(k) for k in EFA_ENV}
    assert None not in image_env.values(), f"infra/Dockerfile sets no {image_env}"
    options = load_docs(ROOT / "infra/cluster.yaml")[0]["docker"]["worker_run_options"]
    ray_up_env = dict(o[3:].split("=", 1) for o in options if o.startswith("-e "))
    assert {k: ray_up_env.get(k) for k in EFA_ENV} == image_env, "infra/cluster.yaml GPU workers"
    containers = gpu_worker_containers()
    assert len(containers) == len(MANIFESTS)
    for where, _pod, container in containers:
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        assert {k: env.get(k) for k in EFA_ENV} == image_env, where


def test_kuberay_gpu_workers_get_efa_devices_hugepages_and_a_memory_backed_shm() -> None:
    for where, pod, container in gpu_worker_containers():
        resources = container["resources"]
        instance_type = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        for kind in ("limits", "requests"):
            assert int(resources[kind].get(EFA_RESOURCE, 0)) == EFA_CARDS[instance_type], (where, kind)
        hugepages = {kind: resources[kind].get("hugepages-2Mi") for kind in ("limits", "requests")}
        assert hugepages["limits"] and hugepages["limits"] == hugepages["requests"], (where, hugepages)
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"], where
        shm = next(m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in pod["volumes"] if v["name"] == shm)
        assert volume["emptyDir"]["medium"] == "Memory", where


def test_rayjob_runtime_env_matches_infra_runtime_env() -> None:
    runtime_env = load_docs(ROOT / "infra/runtime_env.yaml")[0]
    assert runtime_env["env_vars"]["NO_ALBUMENTATIONS_UPDATE"] == "1"
    assert ".venv" in runtime_env["excludes"]
    for path, doc in manifests():
        if doc["kind"] == "RayJob":
            assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"] == runtime_env["env_vars"], path


@pytest.mark.parametrize("name", ["base", "large"])
def test_cluster_configs_load_with_the_paper_token_layout(name: str) -> None:
    cfg = Config.load(ROOT / f"configs/{name}.yaml")
    assert (cfg.dalle.text_seq_len, cfg.dalle.image_seq_len, cfg.dalle.num_image_tokens) == (256, 1024, 8192)
    assert cfg.vae.image_size == 256 and cfg.vae.num_layers == 3
    train = cfg.train
    assert train.use_gpu and train.precision == "bf16" and train.zero_stage in (2, 3)
    assert train.num_workers == {"base": 8, "large": 64}[name]
    paths = cfg.paths.resolved()
    for key in ("raw", "shards", "runs", "evaluation"):
        assert getattr(paths, key).startswith("s3://"), key


@pytest.mark.parametrize("name", ["base", "large"])
def test_yaml_comments_state_what_the_code_computes(name: str) -> None:
    """The arithmetic written beside the config values is the dry-run's, so it cannot silently go stale."""
    text = (ROOT / f"configs/{name}.yaml").read_text()
    plan = plan_resources("train", Config.load(ROOT / f"configs/{name}.yaml"))
    tokens = int(re.search(r"# tokens per step: .*= ([\d,]+) tokens", text).group(1).replace(",", ""))
    assert tokens == plan["deepspeed"]["tokens_per_step"]
    total = float(re.search(r"#\s+total\s+~ ([\d.]+) GiB", text).group(1))
    assert total == pytest.approx(plan["memory_per_worker"]["total_gib"], abs=0.1)
    params = float(re.search(r"# params: ([\d.]+) B", text).group(1))
    assert params == pytest.approx(plan["model"]["params"] / 1e9, abs=0.01)
    flops = float(re.search(r"FLOPs per token \(DALLE.flops_per_token\): ([\d.]+) GFLOP", text).group(1))
    assert flops == pytest.approx(plan["model"]["flops_per_token"] / 1e9, rel=0.01)
    per_gpu = float(re.search(r"at 40% MFU ([\d.]+) k tokens/s/GPU", text).group(1))
    assert per_gpu == pytest.approx(plan["throughput_per_worker"]["tokens_per_s"] / 1e3, rel=0.01)
    assert plan["memory_per_worker"]["total_gib"] < 80


def test_dry_run_prints_the_resources_each_cluster_job_asks_for(dry_runs: dict[str, dict[str, Any]]) -> None:
    train, pre, ev = dry_runs["train"], dry_runs["pretokenize"], dry_runs["evaluate"]
    assert train["total"]["GPU"] == 64 and train["resources_per_worker"]["GPU"] == 1
    assert train["deepspeed"]["zero_stage"] == 3 and train["memory_per_worker"]["total_gib"] < 80
    assert pre["total"]["GPU"] == 8 and pre["encode_actors"]["actors_per_gpu"] == 2
    assert ev["total"]["GPU"] == 16 and ev["generator"]["resources_per_replica"]["GPU"] == 1
    assert ev["generator_memory_gib"]["total"] < 80
    vae, clip = dry_runs["train_vae"], dry_runs["train_clip"]
    assert vae["total"]["GPU"] == 16 and vae["resources_per_worker"]["GPU"] == 1 and vae["global_batch"] == 512
    assert clip["total"]["GPU"] == 16 and clip["resources_per_worker"]["GPU"] == 1 and clip["global_batch"] == 4096


def test_each_rayjob_cluster_holds_what_its_job_plans_to_ask_for(dry_runs: dict[str, dict[str, Any]]) -> None:
    for path, doc in manifests():
        if doc["kind"] != "RayJob":
            continue
        script, config = entrypoint_job_and_config(doc["spec"]["entrypoint"])
        assert config == "configs/large.yaml", path
        cluster = doc["spec"]["rayClusterSpec"]
        needed = dry_runs[Path(script).stem]["total"]
        assert gpu_capacity(cluster) == needed["GPU"], f"{path}: GPUs idle or missing"
        assert cpu_capacity(cluster) >= needed["CPU"], path


@pytest.mark.parametrize("name", ["base", "large"])
def test_the_long_lived_raycluster_scales_to_every_job_of_the_cluster_presets(name: str) -> None:
    cluster = next(doc for _, doc in manifests() if doc["kind"] == "RayCluster")["spec"]
    gpus, cpus = gpu_capacity(cluster, "maxReplicas"), cpu_capacity(cluster, "maxReplicas")
    cfg = Config.load(ROOT / f"configs/{name}.yaml")
    for job in JOBS:
        total = plan_resources(job, cfg)["total"]
        assert total["GPU"] <= gpus and total["CPU"] <= cpus, (job, total)


def test_dry_run_rejects_a_bad_config_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  zero_stage: 5\n")
    proc = subprocess.run([sys.executable, "jobs/dry_run.py", "--job", "train", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.zero_stage" in proc.stderr


@pytest.mark.parametrize("content", [None, "train: [1\n", b"\xff\xfe\x00"], ids=["missing", "not-yaml", "binary"])
def test_dry_run_rejects_a_missing_or_non_yaml_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 content: str | bytes | None) -> None:
    path = tmp_path / "config.yaml"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    assert dry_run_main()(["--job", "train", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"dry_run: {path}: ") and captured.err.count("\n") == 1


def test_dry_run_offers_every_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert JOBS == ("make_synthetic", "ingest", "train_tokenizer", "train_vae", "pretokenize", "train", "train_clip",
                    "evaluate")
    assert dry_run_main()(["--job", "make_synthetic"]) == 0
    assert json.loads(capsys.readouterr().out)["job"] == "make_synthetic"
    with pytest.raises(SystemExit):
        dry_run_main()(["--job", "nope"])
    with pytest.raises(ValueError, match="unknown job"):
        plan_resources("nope", Config.load())


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_job_plans_under_every_preset(path: Path) -> None:
    cfg = Config.load(path)
    for job in JOBS:
        plan = plan_resources(job, cfg)
        assert plan["job"] == job and isinstance(plan["ray"], str), job
        assert {"CPU", "GPU"} <= set(plan["total"]) and min(plan["total"].values()) >= 0, (job, plan["total"])
        assert json.loads(json.dumps(plan)) == plan, f"{job}: plan is not JSON-ready"


@pytest.mark.parametrize("name", ["base", "large"])
def test_every_trainer_of_the_cluster_presets_runs_on_gpus_and_survives_failures(name: str) -> None:
    cfg = Config.load(ROOT / f"configs/{name}.yaml")
    for job in ("train_vae", "train", "train_clip"):
        plan = plan_resources(job, cfg)
        section = getattr(cfg, job)
        assert plan["resources_per_worker"] == worker_resources(section), job
        assert plan["total"]["GPU"] == section.num_workers and plan["run"]["precision"] == "bf16", job
        assert plan["run"]["max_failures"] >= 1 and plan["run"]["checkpoint_every"] < plan["run"]["max_steps"], job


def test_dvae_plan_under_base_asks_for_gpus() -> None:
    cfg = Config.load(ROOT / "configs/base.yaml")
    plan = plan_resources("train_vae", cfg)
    assert plan["resources_per_worker"] == {"CPU": 8, "GPU": 1} and plan["total"] == {"CPU": 64, "GPU": 8}
    assert plan["global_batch"] == 512 and plan["pictures_per_run"] == 512 * cfg.train_vae.max_steps
    with torch.device("meta"):
        vae = DiscreteVAE(cfg.vae)
    assert plan["model"]["params"] == sum(p.numel() for p in vae.parameters())
    assert plan["model"]["encoder_params"] == sum(p.numel() for p in vae.encoder.parameters())


@pytest.mark.parametrize("name", ["base", "large"])
def test_yaml_comments_on_the_dvae_and_clip_state_what_the_code_computes(name: str) -> None:
    text = (ROOT / f"configs/{name}.yaml").read_text()
    cfg = Config.load(ROOT / f"configs/{name}.yaml")
    vae, clip = plan_resources("train_vae", cfg), plan_resources("train_clip", cfg)
    global_batch = re.search(r"# global batch: (\d+) pictures x (\d+) GPUs = ([\d,]+) pictures per step", text)
    per, gpus, batch = global_batch.groups()
    assert (int(per), int(gpus), int(batch.replace(",", ""))) == (
        vae["run"]["batch_per_worker"], vae["total"]["GPU"], vae["global_batch"])
    pictures = float(re.search(r"max_steps: \d+ +# ([\d.]+) M pictures", text).group(1))
    assert pictures == pytest.approx(vae["pictures_per_run"] / 1e6, abs=0.05)
    params, encoder = map(float, re.search(r"# ([\d.]+) M params \(([\d.]+) M in the encoder\)", text).groups())
    assert (params, encoder) == pytest.approx((vae["model"]["params"] / 1e6, vae["model"]["encoder_params"] / 1e6),
                                              abs=0.05)
    gflops = float(re.search(r"encoder: ([\d.]+) GFLOPs per picture", text).group(1))
    assert gflops == pytest.approx(vae["model"]["encoder_flops_per_image"] / 1e9, abs=0.05)
    start, end, step = re.search(r"([\d.]+) -> ([\d.]+) by step ([\d,]+) \(exp\(-rate x step\)\)", text).groups()
    assert (float(start), float(end)) == (cfg.vae.temperature, cfg.train_vae.temperature_min)
    assert int(step.replace(",", "")) == pytest.approx(
        math.log(cfg.vae.temperature / cfg.train_vae.temperature_min) / cfg.train_vae.anneal_rate, rel=0.01)
    pairs = int(re.search(r"per GPU: (\d+) pairs per contrastive batch", text).group(1))
    assert pairs == clip["global_batch"]


@pytest.mark.parametrize("section_type", [TrainVAEConfig, TrainConfig, TrainCLIPConfig])
def test_worker_resources_put_custom_resources_first(section_type: type) -> None:
    section = section_type(num_workers=4, cpus_per_worker=6, use_gpu=True, resources_per_worker={"worker_node": 1.0})
    assert list(worker_resources(section).items()) == [("worker_node", 1.0), ("CPU", 6), ("GPU", 1)]
    assert worker_resources(section_type(cpus_per_worker=2)) == {"CPU": 2}
    assert worker_resources(section_type(use_gpu=True, resources_per_worker={"GPU": 0.5}))["GPU"] == 0.5


def test_plans_hold_the_custom_resources_the_trainers_ask_for() -> None:
    cfg = Config.load(overrides={"train_clip.resources_per_worker": {"worker_node": 1}, "train_clip.num_workers": 3})
    plan = plan_resources("train_clip", cfg)
    assert plan["resources_per_worker"] == worker_resources(cfg.train_clip) == {"worker_node": 1, "CPU": 1}
    assert plan["total"] == {"CPU": 3, "GPU": 0, "worker_node": 3}


def test_actor_options_are_what_the_plans_show() -> None:
    tiny, large = Config.load(), Config.load(ROOT / "configs/large.yaml")
    assert encoder_actor_options(tiny.pretokenize)["num_gpus"] is None, "a CPU actor must ask for no GPU"
    assert encoder_actor_options(large.pretokenize) == {"concurrency": 16, "num_cpus": 2, "num_gpus": 0.5}
    actors = plan_resources("pretokenize", large)["encode_actors"]
    assert actors["concurrency"] == 16 and actors["resources_per_actor"] == {"CPU": 2, "GPU": 0.5}
    ev = large.evaluate
    assert deployment_actor_options(ev.generator_num_cpus, ev.generator_num_gpus) == {"num_cpus": 8, "num_gpus": 1}
    plan = plan_resources("evaluate", large)
    assert plan["generator"]["resources_per_replica"] == {"CPU": 8, "GPU": 1}
    assert plan["scorer"]["resources_per_replica"] == {"CPU": 4, "GPU": 0.5}


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_every_preset_keeps_its_generators_fed_and_sizes_their_memory_in_the_sampler_dtype(name: str) -> None:
    cfg = Config.load(ROOT / f"configs/{name}.yaml")
    driver, memory = (plan_resources("evaluate", cfg)[k] for k in ("driver", "generator_memory_gib"))
    ev = cfg.evaluate
    assert driver["prompts_in_flight"] == ev.driver_concurrency * ev.driver_batch_size
    assert driver["prompts_in_flight"] >= driver["prompts_in_flight_to_keep_generators_busy"] == \
        2 * ev.generator_replicas * ev.max_batch_size
    assert memory["bytes_per_value"] == (2 if ev.generator_num_gpus else 4)  # auto: bf16 on a GPU, fp32 on a CPU
    fp32 = plan_resources("evaluate", Config.load(ROOT / f"configs/{name}.yaml", {"sampling.precision": "fp32"}))
    assert fp32["generator_memory_gib"]["kv_cache"] == pytest.approx(memory["kv_cache"] * 4 / memory["bytes_per_value"],
                                                                      abs=0.02)


def test_ingest_plan_follows_the_source() -> None:
    urls = plan_resources("ingest", Config.load(overrides={"ingest.processes_count": 4, "ingest.thread_count": 32}))
    assert urls["img2dataset"]["parallel_downloads"] == 128 and urls["total"] == {"CPU": 0, "GPU": 0}
    for source in ("folder", "webdataset"):
        plan = plan_resources("ingest", Config.load(overrides={"ingest.source": source}))
        assert plan["shard_tasks"]["resources_per_task"] == {"CPU": 1}, source


def test_resources_plans_without_ray_or_the_train_and_serve_wings() -> None:
    code = ("import sys, pipelines.resources; print(sorted(m for m in sys.modules if m == 'ray' or "
            "m.startswith(('ray.', 'pipelines.train', 'pipelines.serve'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_activation_constant_matches_what_autograd_saves() -> None:
    """Re-measures ACTIVATION_ELEMENTS_PER_DIM: bytes autograd keeps per token per layer, divided by dim."""

    def saved_bytes(depth: int) -> tuple[int, int]:
        torch.manual_seed(0)
        cfg = DALLEConfig(num_text_tokens=64, text_seq_len=16, num_image_tokens=64, image_fmap_size=8, dim=256,
                          depth=depth, heads=4, dim_head=64)
        model = DALLE(cfg).to(torch.bfloat16)
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        text, codes = torch.randint(1, 64, (2, 16)), torch.randint(0, 64, (2, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(text, codes, return_loss=True)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in storages.items() if ptr not in weights), 2 * cfg.seq_len

    (shallow, tokens), (deep, _) = saved_bytes(1), saved_bytes(3)
    per_dim = (deep - shallow) / 2 / tokens / 256 / 2  # per layer, per token, per dim, in bf16 elements
    assert per_dim == pytest.approx(ACTIVATION_ELEMENTS_PER_DIM, rel=0.15)
