"""Cluster definitions and the local multi-node cluster script.

    python -m pytest tests/test_cluster.py -q            # all (the slow one starts a real 2-node cluster, ~30 s)
    python -m pytest tests/test_cluster.py -q -m "not slow"

ray_cluster.yaml is validated offline the way `ray up` starts (Ray's JSON schema, then Ray's prepare_config and
validate_config); the KubeRay manifests can only be parsed and checked for the fields that matter here.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

from cluster import local_cluster  # noqa: E402
from cluster.validate import schema, validate_cluster_config  # noqa: E402

KUBERAY = ROOT / "cluster" / "kuberay"


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


# ---- ray_cluster.yaml ------------------------------------------------------------------------------------------


def test_ray_cluster_yaml_validates(cluster_config):
    prepared = validate_cluster_config(cluster_config)
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert all(t["max_workers"] >= t.get("min_workers", 0) for t in workers)
    # the dashboard (which runs arbitrary jobs) binds to localhost on the head; users forward it with `ray dashboard`
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    # the project is synced to every node and installed with the repo's pins
    assert "." in prepared["file_mounts"].values()
    install = " ".join(prepared["setup_commands"])
    assert "constraints.txt" in install and "-e " in install
    pins = (ROOT / "constraints.txt").read_text()
    assert f"ray=={ray.__version__}" in pins
    assert ray.__version__ in prepared["docker"]["image"]


def _ray_checks(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("check", ["schema", "ray"])
def test_unknown_top_level_key_is_rejected(cluster_config, check):
    bad = copy.deepcopy(cluster_config)
    bad["head_node_typo"] = "head.cpu"
    with pytest.raises(jsonschema.ValidationError, match="head_node_typo"):
        if check == "schema":
            jsonschema.validate(bad, schema())
        else:
            _ray_checks(bad)


@pytest.mark.parametrize("check", ["schema", "ray"])
def test_missing_provider_type_is_rejected(cluster_config, check):
    bad = copy.deepcopy(cluster_config)
    del bad["provider"]["type"]
    if check == "schema":
        with pytest.raises(jsonschema.ValidationError, match="'type' is a required property"):
            jsonschema.validate(bad, schema())
    else:
        with pytest.raises(KeyError, match="type"):  # prepare_config looks up the provider's defaults by type
            _ray_checks(bad)


def test_only_cluster_name_and_provider_type_are_required():
    validate_cluster_config({"cluster_name": "minimal", "provider": {"type": "aws", "region": "us-west-2"}})


def test_head_type_must_exist(cluster_config):
    bad = copy.deepcopy(cluster_config)
    bad["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_cluster_config(bad)


# ---- KubeRay manifests -----------------------------------------------------------------------------------------


def _manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_kuberay_manifests_have_required_fields():
    docs = _manifests()
    assert {"RayCluster/instagan", "RayJob/instagan-train"} <= set(docs)
    for name, doc in docs.items():
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], name
        assert "spec" in doc or "data" in doc, name
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1", name


def _cluster_specs() -> dict[str, dict]:
    docs = _manifests()
    return {"RayCluster": docs["RayCluster/instagan"]["spec"],
            "RayJob": docs["RayJob/instagan-train"]["spec"]["rayClusterSpec"]}


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_kuberay_gpu_workers_cpu_head_token_auth(owner):
    spec = _cluster_specs()[owner]
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    for c in _containers(spec["headGroupSpec"]):
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in _containers(g))]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_kuberay_claims_exist():
    docs = _manifests()
    claims = {name.split("/", 1)[1] for name in docs if name.startswith("PersistentVolumeClaim/")}
    for owner, spec in _cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for vol in group["template"]["spec"].get("volumes", []):
                if "persistentVolumeClaim" in vol:
                    assert vol["persistentVolumeClaim"]["claimName"] in claims, owner


def test_rayjob_runs_train_with_a_mounted_config():
    from instagan.config import Config

    docs = _manifests()
    job = docs["RayJob/instagan-train"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    config_path = argv[argv.index("--config") + 1]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    # the relative jobs/train.py resolves in the container's working dir, where the image holds the repo
    assert container["workingDir"].startswith("/")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config_path)
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = docs[f"ConfigMap/{volume['configMap']['name']}"]
    Config.from_dict(yaml.safe_load(config_map["data"][mount["subPath"]]))  # the config train.py will read


# ---- local multi-node cluster (real Ray) -----------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


def _ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], env=_client_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = _client_env()
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(ROOT / "cluster" / "local_cluster.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _keys(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if re.match(r"^[A-Z_]+=", line))


@pytest.mark.slow
def test_local_cluster_runs_a_submitted_job(tmp_path):
    base = tmp_path / "cluster"
    port, dashboard_port = _free_ports(2)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "hello.py").write_text(
        "import ray\n"
        "ray.init()\n"
        "alive = [n for n in ray.nodes() if n['Alive']]\n"
        "print(f\"HELLO nodes={len(alive)} cpus={ray.cluster_resources()['CPU']:.0f}\")\n"
        "print('RESOURCES', ray.cluster_resources())\n"
    )
    try:
        started = _script("start", "--workers", "1", "--cpus-per-node", "2", "--base-dir", str(base),
                          "--port", str(port), "--dashboard-port", str(dashboard_port), "--object-store-mb", "256")
        assert started.returncode == 0, started.stderr
        out = _keys(started.stdout)
        assert out["RAY_ADDRESS"] == f"127.0.0.1:{port}"
        assert out["DASHBOARD"] == f"http://127.0.0.1:{dashboard_port}"
        assert out["RAY_AUTH_MODE"] == "disabled" and out["NODES"] == "2"

        status = _keys(_script("status", "--base-dir", str(base)).stdout)
        assert status["RUNNING"] == "1" and status["ALIVE_NODES"] == "2"
        state = local_cluster.status(base)
        assert len({n["temp_dir"] for n in state["nodes"]}) == 2  # one temp dir per node

        submitted = _ray_cli("job", "submit", "--address", out["DASHBOARD"], "--submission-id", "hello-1",
                             "--working-dir", str(job_dir), "--", "python", "hello.py")
        logs = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, logs
        assert "HELLO nodes=2 cpus=4" in logs
        job = local_cluster.http_get(f"{out['DASHBOARD']}/api/jobs/hello-1", token=None)  # the Jobs REST API
        assert job["status"] == "SUCCEEDED", job

        stopped = _script("stop", "--base-dir", str(base))
        assert stopped.returncode == 0, stopped.stderr
        assert _script("status", "--base-dir", str(base)).stdout.startswith("RUNNING=0")
        assert local_cluster.leftover_pids(base) == []  # no Ray process of this cluster is left
    finally:
        local_cluster.stop(base)  # no-op once stopped; always leaves no cluster behind
