"""GPU worker settings, checked on whatever this machine has: fractional GPU shares, JAX memory settings in the
actors' environment, a clear refusal of GPU actors on a cluster without GPUs, and benchmarks/gpu_check.py --small."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kernelscale import runtime
from kernelscale.cli import build_parser
from kernelscale.errors import InputError


def test_actor_env_vars_reach_the_actors(ray_local):
    import ray

    @ray.remote
    class Probe:
        def env(self) -> dict:
            import os

            return {k: os.environ.get(k) for k in runtime.ACTOR_ENV_VARS}

    actor = Probe.options(**runtime.actor_options(0.0)).remote()
    assert ray.get(actor.env.remote()) == runtime.ACTOR_ENV_VARS
    assert runtime.ACTOR_ENV_VARS["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    ray.kill(actor)


def test_fractional_gpus_pack_actors(monkeypatch):
    import ray

    assert build_parser().parse_args(["gram", "d.zarr", "--arch", "fc", "--out", "g.zarr",
                                      "--gpus-per-worker", "0.5"]).gpus_per_worker == 0.5
    assert runtime.actor_options(0.5)["num_gpus"] == 0.5  # Ray packs two such actors on one GPU
    assert runtime.actor_options(1.0)["num_gpus"] == 1.0  # one actor per GPU, CUDA_VISIBLE_DEVICES set by Ray
    assert "num_gpus" not in runtime.actor_options(0.0)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    assert runtime.cluster_slots(1.0) == 4 and runtime.cluster_slots(0.5) == 8 and runtime.cluster_slots(0.25) == 16


def test_gpu_actors_on_a_cluster_without_gpus_are_refused(ray_local, mnist_small, tmp_path):
    """Without this check the actors would wait forever for a GPU that does not exist."""
    import ray

    from kernelscale import compute_gram, parse_arch

    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has GPUs")
    with pytest.raises(InputError, match="GPU"):
        compute_gram(mnist_small["train"], parse_arch("fc"), str(tmp_path / "g.zarr"), gpus_per_worker=0.5,
                     progress=False)
    with pytest.raises(InputError, match="gpus-per-worker"):
        compute_gram(mnist_small["train"], parse_arch("fc"), str(tmp_path / "g2.zarr"), gpus_per_worker=-1,
                     progress=False)


def test_gpu_check_small_runs_on_cpu(ray_local, tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--small", "--archs", "fc,convnet", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"gram"' in printed
    if out["devices"]["backend"] != "gpu":
        assert out["devices"]["fallback"] == "cpu" and out["gpus_per_worker"] == 0.0
    for arch in ("fc", "convnet"):
        assert out["gram"][arch]["stored_entries_per_s"] > 0
    assert out["solve"]["status"] == "converged" and out["solve"]["seconds_per_iteration"] > 0
    assert out["kip"]["seconds_per_step"] > 0 and out["kip"]["final_loss"] == out["kip"]["final_loss"]
