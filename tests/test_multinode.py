"""A real multi-node Ray cluster on loopback: a head and two worker nodes started with ``ray start``, each
its own raylet with 1 CPU, and kernelscale commands run as subprocesses with RAY_ADDRESS pointing at it.

Shows tiles computed on every node, KIP target shards on more than one node, and a worker node killed in the
middle of a Gram run with the run still completing and the store identical to an undisturbed run.

The cluster runs in its own temp dir and process groups; this module never calls ``ray.init`` (the session's
``ray_local`` cluster, if any, is left alone) and the finalizer kills only the process groups it started.
Ray's ``ray start`` turns a 127.0.0.1 ``--address`` into the machine's routable IP, so worker nodes are started
through a small wrapper that keeps the loopback address; the head and the drivers get
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` so they stay on 127.0.0.1 too.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
# `ray start` for a worker node, keeping a loopback --address as given (Ray would resolve it to the routable IP).
WORKER_START = ("import sys; import ray._private.services as s; s.resolve_ip_for_localhost = lambda h: h; "
                "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()")
# Ray token authentication, on for every node and driver: the passthrough the cluster configs rely on.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
MEMORY_BUDGET = str(256 * 2**20)  # fixed, so the kernel-call size (and every float) is the same in every run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "JAX_PLATFORMS": "cpu", **AUTH, **extra})
    return env


def _client_server_port() -> list[str]:
    """With ray[client] installed, `ray start --head` opens a Ray Client server on port 10001 unless told another
    port (a free one here, so parallel runs don't clash); the minimal `ray` of a fresh install has no client server
    and refuses the flag."""
    from ray._private.parameter import get_ray_client_dependency_error

    return [] if get_ray_client_dependency_error() is not None else ["--ray-client-server-port", str(_free_port())]


class LoopbackCluster:
    """Head + worker nodes as ``ray start --block`` processes, each in its own process group."""

    def __init__(self, root: str):
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}

    def _popen(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(os.path.join(self.root, f"{name}.log"), "w")  # noqa: SIM115 - closed with the process
        self.nodes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def start_head(self) -> None:
        self._popen("head", [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                             "--num-cpus", "1", "--include-dashboard", "false", "--dashboard-host", "127.0.0.1",
                             *_client_server_port(), "--temp-dir", self.root, "--disable-usage-stats"],
                    _env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))

    def start_worker(self, name: str) -> None:
        self._popen(name, [sys.executable, "-c", WORKER_START, "start", "--block", "--address", self.address,
                           "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                           "--resources", json.dumps({name: 1}),
                           # own temp dir: several raylets on one machine must not share socket paths
                           "--temp-dir", os.path.join(self.root, name)], _env())

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        code = ("import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))" % self.address)
        deadline = time.time() + timeout
        alive = 0
        while time.time() < deadline:
            for name, proc in self.nodes.items():
                assert proc.poll() is None, f"node {name} exited: {open(os.path.join(self.root, name + '.log')).read()[-3000:]}"
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               env=_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
            if r.returncode == 0 and r.stdout.strip():
                alive = int(r.stdout.strip().splitlines()[-1])
                if alive >= count:
                    return
            time.sleep(1)
        raise AssertionError(f"only {alive} of {count} Ray nodes came up")

    def pids(self, name: str) -> set[int]:
        """Every live process of node ``name`` (its process group, plus descendants that left it)."""
        proc = self.nodes[name]
        out: set[int] = set()
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == proc.pid:
                    out.add(p.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        try:
            out |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
        return out

    def kill(self, name: str) -> None:
        pids = self.pids(name)
        try:
            os.killpg(self.nodes[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[name].wait(timeout=30)

    def stop(self) -> None:
        for name in list(self.nodes)[::-1]:
            self.kill(name)


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="ksmn", dir="/tmp")  # short: Ray's socket paths live under it
    c = LoopbackCluster(root)
    try:
        c.start_head()  # worker nodes retry until the head's GCS is up
        c.start_worker("node_b")
        c.start_worker("node_c")
        c.wait_for_nodes(3)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> str:
    from kernelscale.data import ingest

    out = str(tmp_path_factory.mktemp("mn") / "rows.zarr")
    ingest("mnist5k", out, limit=640, resize="8x8", preprocess="standardize", progress=False)
    return out


def _kernelscale(cluster: LoopbackCluster, *args: str, timeout: float = 150) -> subprocess.Popen:
    env = _env(RAY_ADDRESS=cluster.address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
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
            for pid in cluster.pids(name):
                try:
                    if "ShardWorker" in " ".join(psutil.Process(pid).cmdline()):
                        seen.setdefault(name, set()).add(pid)
                except psutil.Error:
                    continue
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
