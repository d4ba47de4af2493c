"""A multi-node Ray cluster on one machine, on loopback: a head and worker nodes started with ``ray start --block``.

Each node is its own raylet (``num_cpus`` CPUs, its own temp dir and process group); token authentication is on
with a fresh token. For rehearsing multi-node runs on one machine (``benchmarks/kip_two_node.py``) and for the
multi-node tests. This module never calls ``ray.init`` in its own process, and :meth:`LoopbackCluster.stop` kills
only the process groups it started (``ray stop`` would stop every Ray instance of the user on the machine).

    with LoopbackCluster("/tmp/kslc") as cluster:          # short root: Ray's socket paths live under it
        cluster.start_head()
        cluster.start_worker("node_b")
        cluster.wait_for_nodes(2)
        subprocess.run(["kernelscale", "gram", ...], env=cluster.env(RAY_ADDRESS=cluster.address))
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import psutil

from kernelscale._compat import ray_cli, ray_has_client_server


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """Head + worker nodes on 127.0.0.1 as ``ray start --block`` processes; logs in ``root/<node>.log``."""

    def __init__(self, root: str, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.token = secrets.token_hex(32)

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment for a node or a driver: no inherited RAY_ADDRESS, CPU JAX, the cluster's
        token, and ``extra``. Drivers pass ``RAY_ADDRESS=self.address``."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update({"RAY_USAGE_STATS_ENABLED": "0", "JAX_PLATFORMS": "cpu", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": self.token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra})
        return env

    def _popen(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(os.path.join(self.root, f"{name}.log"), "w")  # noqa: SIM115 - closed with the process
        self.nodes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def start_head(self, num_cpus: int = 1) -> None:
        client = ["--ray-client-server-port", str(free_port())] if ray_has_client_server() else []
        self._popen("head", [*ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(self.port), "--num-cpus", str(num_cpus), "--include-dashboard", "false",
                             "--dashboard-host", "127.0.0.1", *client, "--temp-dir", self.root,
                             "--disable-usage-stats"], self.env())

    def start_worker(self, name: str, num_cpus: int = 1, resources: dict[str, float] | None = None) -> None:
        """A worker node; it carries the custom resource ``{name: 1}`` (or ``resources``) and retries until the
        head is up. Its own temp dir: several raylets on one machine must not share socket paths."""
        env = {k: v for k, v in self.env().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        self._popen(name, [*ray_cli(keep_loopback=True), "start", "--block", "--address", self.address,
                           "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
                           "--resources", json.dumps(resources or {name: 1}),
                           "--temp-dir", os.path.join(self.root, name)], env)

    def alive_nodes(self) -> int:
        """Ray's count of alive nodes, asked by a short driver process (0 while the head is not up)."""
        code = ("import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))" % self.address)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, env=self.env())
        lines = r.stdout.strip().splitlines()
        return int(lines[-1]) if r.returncode == 0 and lines else 0

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        """Block until ``count`` nodes are alive; RuntimeError (with the node's log tail) if a node exits."""
        deadline, alive = time.time() + timeout, 0
        while time.time() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    with open(os.path.join(self.root, name + ".log")) as f:
                        raise RuntimeError(f"Ray node {name} exited: {f.read()[-3000:]}")
            alive = self.alive_nodes()
            if alive >= count:
                return
            time.sleep(1)
        raise RuntimeError(f"only {alive} of {count} Ray nodes came up in {timeout:g} s (logs in {self.root})")

    def pids(self, name: str) -> set[int]:
        """Every live process of node ``name``: its process group, plus descendants that left it."""
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

    def processes_running(self, name: str, marker: str) -> set[int]:
        """The pids of node ``name`` whose command line contains ``marker`` (e.g. an actor class name)."""
        found = set()
        for pid in self.pids(name):
            try:
                if marker in " ".join(psutil.Process(pid).cmdline()):
                    found.add(pid)
            except psutil.Error:
                continue
        return found

    def kill(self, name: str) -> None:
        """SIGKILL node ``name``: its process group and every descendant."""
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
        """Kill every node this cluster started, workers first."""
        for name in list(self.nodes)[::-1]:
            self.kill(name)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
