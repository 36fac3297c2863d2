"""The deployment files in infra/ hold together: every manifest parses and has its required fields, the RayJob and
the cluster launcher run a real preset that validates with their overrides and get the GPUs it asks for, token
auth is on everywhere, secrets come from Secrets only, and the Dockerfile installs torch before fewstep."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from fewstep.config import TrainConfig, load_config
from pipelines.presets import available, preset_path

INFRA = Path(__file__).resolve().parents[1] / "infra"
K8S, CLUSTER, DOCKER = INFRA / "k8s", INFRA / "cluster", INFRA / "docker"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|BACKEND_STORE|TRACKING_URI")


def docs(path: Path) -> list[dict]:
    out = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert out and all(isinstance(d, dict) for d in out), path
    return out


def k8s_objects() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in docs(p)]


def by_kind(kind: str) -> list[dict]:
    return [d for d in k8s_objects() if d["kind"] == kind]


def pod_specs(obj: dict) -> dict[str, dict]:
    """Every pod template of an object, by role: {'head': spec, 'gpu': spec, 'submitter': spec, 'pod': spec}."""
    if obj["kind"] in ("RayCluster", "RayJob"):
        rc = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
        out = {"head": rc["headGroupSpec"]["template"]["spec"]}
        out.update({g["groupName"]: g["template"]["spec"] for g in rc["workerGroupSpecs"]})
        if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
            out["submitter"] = obj["spec"]["submitterPodTemplate"]["spec"]
        return out
    if obj["kind"] == "Deployment":
        return {"pod": obj["spec"]["template"]["spec"]}
    return {}


def containers(obj: dict) -> list[dict]:
    return [c for spec in pod_specs(obj).values() for c in spec["containers"]]


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def train_command(argv: list[str]) -> TrainConfig:
    """`python -m pipelines.train --preset P --set k=v ...` -> the config it would run (loaded and validated by
    fewstep's own loader)."""
    assert argv[:3] == ["python", "-m", "pipelines.train"], argv
    preset = argv[argv.index("--preset") + 1]
    assert preset in available(), preset
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(preset_path(preset), None, sets)


def gpus(container: dict) -> int:
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"].get("nvidia.com/gpu") == limits.get("nvidia.com/gpu"), container["name"]
    return int(limits.get("nvidia.com/gpu", 0))


def gpu_capacity(cluster_spec: dict) -> int:
    return sum(g["replicas"] * sum(gpus(c) for c in g["template"]["spec"]["containers"])
               for g in cluster_spec["workerGroupSpecs"])


def test_every_manifest_parses_with_required_fields():
    for obj in k8s_objects():
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), where
        if obj["kind"] != "Namespace":
            assert isinstance(obj.get("spec"), dict), where
        for c in containers(obj):
            assert c.get("image") and not c["image"].endswith(":latest"), where
            assert c["resources"]["requests"] and c["resources"]["limits"], (where, c["name"])
    kinds = {d["kind"] for d in k8s_objects()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim", "NetworkPolicy"} <= kinds
    for job in by_kind("RayJob"):
        assert job["spec"]["entrypoint"] and job["spec"]["rayClusterSpec"]


def test_kustomization_lists_existing_files_and_retags_the_image():
    k = docs(K8S / "kustomization.yaml")[0]
    assert k["kind"] == "Kustomization" and k["namespace"] == "fewstep"
    assert all((K8S / r).is_file() for r in k["resources"])
    names = {c["image"].split(":")[0] for p in k["resources"] for d in docs(K8S / p) for c in containers(d)}
    assert names == {i["name"] for i in k["images"]}


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_ray_clusters_token_auth_storage_and_ports(kind):
    pvcs = {p["metadata"]["name"]: p for p in by_kind("PersistentVolumeClaim")}
    for obj in by_kind(kind):
        for role, spec in pod_specs(obj).items():
            for c in spec["containers"]:
                e = env(c)
                assert e["RAY_AUTH_MODE"]["value"] == "token", (role, c["name"])
                assert e["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], (role, c["name"])
                if role == "submitter":
                    continue
                assert "secretKeyRef" in e["MLFLOW_TRACKING_URI"]["valueFrom"]
                mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                          for v in spec["volumes"] if "persistentVolumeClaim" in v}
                assert mounts["runs"] == "/mnt/fewstep/runs" and claims["runs"] in pvcs
                assert pvcs[claims["runs"]]["spec"]["accessModes"] == ["ReadWriteMany"]
        rc = obj["spec"]["rayClusterSpec"] if kind == "RayJob" else obj["spec"]
        head = rc["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and head["rayStartParams"]["num-cpus"] == "0"
        (hc,) = head["template"]["spec"]["containers"]
        assert gpus(hc) == 0  # the head is a CPU node
        assert {p["containerPort"] for p in hc["ports"]} >= {6379, 8265, 10001}


def test_rayjob_entrypoint_runs_a_real_preset_on_enough_gpus():
    (job,) = by_kind("RayJob")
    cfg = train_command(shlex.split(job["spec"]["entrypoint"]))
    assert cfg.name == "imagenet64-ict" and cfg.engine.use_gpu
    assert cfg.engine.storage_path == "/mnt/fewstep/runs"  # = the shared volume's mount path
    assert gpu_capacity(job["spec"]["rayClusterSpec"]) >= cfg.engine.num_workers
    for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert g["minReplicas"] == g["replicas"] <= g["maxReplicas"]
    # the standing RayCluster covers the largest ImageNet-64 preset as shipped
    (rc,) = by_kind("RayCluster")
    widest = max(load_config(preset_path(p)).engine.num_workers for p in available() if p.startswith("imagenet64-")
                 and not p.endswith("mcd"))
    assert gpu_capacity(rc["spec"]) >= widest


def test_mlflow_is_internal_and_reads_its_stores_from_secrets():
    (dep,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (svc,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "mlflow"]
    (c,) = containers(dep)
    e = env(c)
    assert "secretKeyRef" in e["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert e["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert svc["spec"]["type"] == "ClusterIP"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert all(ports[p["targetPort"]] == p["port"] for p in svc["spec"]["ports"])
    (policy,) = by_kind("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "--host" not in c["args"]  # from MLFLOW_HOST, in-pod only


def test_no_plaintext_secrets():
    assert not by_kind("Secret")  # created by secrets.sh from the environment, never committed
    for obj in k8s_objects():
        for c in containers(obj):
            for name, e in env(c).items():
                if SECRET_NAME.search(name) and name != "RAY_AUTH_MODE":
                    assert "secretKeyRef" in e.get("valueFrom", {}), (obj["metadata"]["name"], name)
    # a DB URI with a password, an AWS key id, a token or password as a YAML value (a file path is fine)
    leaks = re.compile(r"postgres(ql)?://[^:\s/]+:[^@\s]+@|AKIA[0-9A-Z]{16}|(?<!/)(auth_token|password):\s*(?![~/])\S",
                       re.I)
    for path in INFRA.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".sh", "") and path.name != "README.md":
            assert not leaks.search(path.read_text()), path


def test_dockerfile_installs_cuda_torch_before_fewstep_and_names_real_modules():
    text = (DOCKER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]
    torch_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install .*\"?torch==", ln))
    fewstep_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install( -q)? \.(\s|$)", ln))
    assert torch_at < fewstep_at and "--index-url" in lines[torch_at]
    assert "ENV" in text and re.search(r"RAY_AUTH_MODE=token", text)
    (cmd,) = [ln for ln in lines if ln.startswith("CMD")]
    argv = yaml.safe_load(cmd[len("CMD"):])
    assert argv[:2] == ["python", "-m"] and importlib.util.find_spec(argv[2]) is not None
    ray = re.search(r"ARG RAY_VERSION=(\S+)", text)[1]
    for obj in by_kind("RayCluster") + by_kind("RayJob"):
        rc = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
        assert rc["rayVersion"] == ray
    assert (DOCKER / "Dockerfile.dockerignore").is_file()  # BuildKit's per-Dockerfile ignore file


def test_cluster_launcher_covers_the_presets_it_submits():
    (launcher,) = docs(CLUSTER / "aws-gpu.yaml")
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type", "docker"):
        assert key in launcher, key
    assert launcher["docker"]["image"]
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert launcher["max_workers"] >= sum(t["min_workers"] for t in workers)
    capacity = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers)
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert any("--dashboard-host=127.0.0.1" in c for c in launcher["head_start_ray_commands"])

    # submit.sh's job: its defaults substituted, the command loads as a real config that fits the cluster
    script = (CLUSTER / "submit.sh").read_text()
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]+)\}$", script, re.M))
    command = script[script.index("python -m pipelines.train"):].replace("\\\n", " ")
    for k, v in defaults.items():
        command = command.replace(f'"${k}"', v).replace(f"${k}", v)
    cfg = train_command(shlex.split(command))
    assert cfg.engine.use_gpu and cfg.engine.storage_path == "/mnt/fewstep/runs"
    assert capacity >= cfg.engine.num_workers
    assert "/mnt/fewstep/runs:/mnt/fewstep/runs" in " ".join(launcher["docker"]["run_options"])


def test_every_infra_shell_script_parses():
    scripts = sorted(INFRA.rglob("*.sh"))
    assert {p.name for p in scripts} >= {"up.sh", "down.sh", "submit.sh", "secrets.sh"}
    for path in scripts:
        out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, f"{path}: {out.stderr}"
