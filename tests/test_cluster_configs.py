"""cluster/: every launch config parses and sets the fields that matter (resources, GPUs, setup, entrypoint)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
PINS = ("jax[cuda12]==0.5.3", "neural-tangents==0.6.5")


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_ray_up_configs(name):
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    assert cfg["provider"]["type"] in ("aws", "gcp")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu), "GPU worker nodes must be declared"
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    setup = "\n".join(cfg["setup_commands"])
    for pin in PINS:
        assert pin in setup
    assert "--no-deps" in setup and "tensorflow" not in setup
    assert any("kernelscale" in dst for dst in cfg["file_mounts"])
    head = " ".join(cfg["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])


def test_kuberay_rayjob():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("kernelscale gram ") and "--gpus-per-worker 1" in spec["entrypoint"]
    assert "s3://" in spec["entrypoint"]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    for group in workers:
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert group["rayStartParams"]["num-gpus"] == "1"
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert env["XLA_PYTHON_CLIENT_PREALLOCATE"]["value"] == "false"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert all(pin in dockerfile for pin in PINS)


def test_slurm_script():
    text = (CLUSTER / "slurm-ray.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=" in text and "#SBATCH --requeue" in text
    assert "ray start --head" in text and "ray start --address" in text
    assert 'export RAY_ADDRESS="$head_ip:$port"' in text and 'kernelscale "$@"' in text
    assert "RAY_AUTH_MODE=token" in text
    bash = shutil.which("bash")
    subprocess.run([bash, "-n", str(CLUSTER / "slurm-ray.sbatch")], check=True)


def test_cluster_readme_shows_submit_and_resume():
    text = (CLUSTER / "README.md").read_text()
    assert "ray job submit" in text and "--working-dir ." in text and "kernelscale gram" in text
    assert "resume" in text.lower()
