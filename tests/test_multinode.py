"""A real multi-node Ray cluster on loopback: a head and two worker nodes started with ``ray start``, each
its own raylet with 1 CPU, and kernelscale commands run as subprocesses with RAY_ADDRESS pointing at it.

Shows tiles computed on every node, KIP target shards on more than one node, and a worker node killed in the
middle of a Gram run with the run still completing and the store identical to an undisturbed run.

The cluster runs in its own temp dir and process groups; this module never calls ``ray.init`` (the session's
``ray_local`` cluster, if any, is left alone) and the finalizer kills only the process groups it started.
The cluster is :class:`kernelscale.loopback_cluster.LoopbackCluster` (worker nodes keep the loopback address;
the head and the drivers stay on 127.0.0.1).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from kernelscale.loopback_cluster import LoopbackCluster

pytestmark = pytest.mark.slow

MEMORY_BUDGET = str(256 * 2**20)  # fixed, so the kernel-call size (and every float) is the same in every run


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="ksmn", dir="/tmp")  # short: Ray's socket paths live under it
    with LoopbackCluster(root) as c:
        c.start_head()  # worker nodes retry until the head's GCS is up
        c.start_worker("node_b")
        c.start_worker("node_c")
        c.wait_for_nodes(3)
        yield c


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> str:
    from kernelscale.data import ingest

    out = str(tmp_path_factory.mktemp("mn") / "rows.zarr")
    ingest("mnist5k", out, limit=640, resize="8x8", preprocess="standardize", progress=False)
    return out


def _kernelscale(cluster: LoopbackCluster, *args: str, timeout: float = 150) -> subprocess.Popen:
    env = cluster.env(RAY_ADDRESS=cluster.address)
    return subprocess.Popen([sys.executable, "-m", "kernelscale.cli", *args, "--json", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _summary(proc: subprocess.Popen, timeout: float = 150) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-3000:]}"
    # the summary line; Ray may forward worker/raylet log lines to the driver's stdout after it (reported)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary on stdout: {out[-2000:]!r}"
    return json.loads(lines[-1])


def _gram_args(rows: str, out: str) -> list[str]:
    return ["gram", rows, "--arch", "fc:depth=3", "--out", out, "--tile", "32", "--workers", "3",
            "--memory-budget", MEMORY_BUDGET]


def test_kip_shards_run_on_several_nodes(cluster, rows, tmp_path):
    """`distill --workers 2`: two ShardWorker actors (1 CPU each, so on two different 1-CPU nodes) share every
    target batch. distill's JSON has no per-node field, so the actors' processes are found in the nodes' trees."""
    proc = _kernelscale(cluster, "distill", rows, "--arch", "fc", "--ipc", "2", "--steps", "4", "--target-batch", "128",
                        "--workers", "2", "--checkpoint-every", "2", "--out", str(tmp_path / "kip.zarr"))
    seen: dict[str, set[int]] = {}
    while proc.poll() is None:
        for name in cluster.nodes:
            if pids := cluster.processes_running(name, "ShardWorker"):
                seen.setdefault(name, set()).update(pids)
        time.sleep(0.2)
    summary = _summary(proc)
    assert summary["status"] == "ok" and summary["steps_done"] == 4 and summary["workers"] == 2
    assert np.isfinite(summary["final_loss"])
    assert len(seen) == 2, f"ShardWorker actors seen on nodes {seen}"


def test_every_node_computes_tiles_and_node_loss_is_survived(cluster, rows, tmp_path):
    from kernelscale.gram.store import open_gram

    undisturbed = str(tmp_path / "gram_a.zarr")
    first = _summary(_kernelscale(cluster, *_gram_args(rows, undisturbed)))
    assert first["tiles_computed"] == first["tiles_total"] == 210
    assert len(first["nodes"]) == 3, first["nodes"]  # one actor per 1-CPU node: every node computed tiles
    assert sum(first["nodes"].values()) == 210

    # the same run, with worker node node_c killed once tiles are being written
    disturbed = str(tmp_path / "gram_b.zarr")
    proc = _kernelscale(cluster, *_gram_args(rows, disturbed))
    chunks = Path(disturbed) / "gram" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if chunks.is_dir() and sum(1 for _ in chunks.glob("*/*")) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before the node could be killed; give it more tiles"
    cluster.kill("node_c")
    second = _summary(proc)
    assert second["tiles_computed"] >= second["tiles_total"] - 6, second
    print("undisturbed nodes", first["nodes"], "with node_c killed", second["nodes"])
    np.testing.assert_array_equal(open_gram(disturbed).to_numpy(), open_gram(undisturbed).to_numpy())
    assert open_gram(disturbed).missing_tiles() == []
