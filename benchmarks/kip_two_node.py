"""KIP with 1,000 classes on a 2-node Ray cluster on this machine (loopback): step time, and which node ran
each target-shard actor.

    .venv/bin/python benchmarks/kip_two_node.py TRAIN.zarr --ipc 1 --steps 20 \\
        --json docs/results_kip_imagenet_scale.json

Starts a head (``ray start --head --node-ip-address 127.0.0.1 --num-cpus 1 --temp-dir /tmp/rh``) and a second
node (``ray start --address 127.0.0.1:PORT --num-cpus 1 --temp-dir /tmp/rw``), each in its own process group,
runs ``RAY_ADDRESS=127.0.0.1:PORT kernelscale distill ... --workers 2 --kss-tile 1000`` (two 1-CPU actors: one
per node), watches the nodes' process trees for the ShardWorker actors, and stops the two nodes (their own
process groups only: ``ray stop`` would stop every Ray instance of the user on the machine). Token
authentication is on (a fresh ``RAY_AUTH_TOKEN``), as ``ray start`` enables it when ``~/.ray/auth_token``
exists. As in tests/test_multinode.py, the worker node is started through a wrapper that keeps the loopback
address (``ray start`` would resolve 127.0.0.1 to the routable IP).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kip_imagenet_scale import update_json
from measure import run_measured

ROOT = Path(__file__).resolve().parents[1]
# `ray start` through this Python (a venv that imports ray from another environment has no `ray` script)
RAY_CLI = "import sys; from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()"
WORKER_START = ("import sys; import ray._private.services as s; s.resolve_ip_for_localhost = lambda h: h; "
                "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()")
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e.update({"RAY_USAGE_STATS_ENABLED": "0", "JAX_PLATFORMS": "cpu", **AUTH, **extra})
    return e


def client_server_port() -> list[str]:
    """A free Ray Client server port when ray[client] is installed (the minimal ray refuses the flag)."""
    from ray._private.parameter import get_ray_client_dependency_error

    return [] if get_ray_client_dependency_error() is not None else ["--ray-client-server-port", str(free_port())]


def node_pids(proc: subprocess.Popen) -> set[int]:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--target-batch", type=int, default=2000)
    p.add_argument("--kss-tile", type=int, default=1000)
    p.add_argument("--head-dir", default="/tmp/rh")
    p.add_argument("--worker-dir", default="/tmp/rw")
    p.add_argument("--out", default="/tmp/kip_2node.zarr")
    p.add_argument("--json")
    args = p.parse_args()
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: dict[str, subprocess.Popen] = {}
    logs = {}
    for name in ("head", "worker"):
        logs[name] = open(f"/tmp/kip_2node_{name}.log", "w")  # noqa: SIM115
    nodes["head"] = subprocess.Popen(
        [sys.executable, "-c", RAY_CLI, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
         "--include-dashboard", "false", "--temp-dir", args.head_dir, "--disable-usage-stats",
         *client_server_port()],
        stdout=logs["head"], stderr=subprocess.STDOUT, env=env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"),
        start_new_session=True)
    nodes["worker"] = subprocess.Popen(
        [sys.executable, "-c", WORKER_START, "start", "--block", "--address", address, "--node-ip-address", "127.0.0.1",
         "--num-cpus", "1", "--temp-dir", args.worker_dir],
        stdout=logs["worker"], stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    res: dict = {"address": address}
    try:
        code = ("import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))" % address)
        deadline, alive = time.time() + 120, 0
        while time.time() < deadline and alive < 2:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                               env=env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
            if r.returncode == 0 and r.stdout.strip():
                alive = int(r.stdout.strip().splitlines()[-1])
            time.sleep(1)
        res["nodes_alive"] = alive
        if alive < 2:
            raise RuntimeError(f"only {alive} nodes came up")
        cmd = [sys.executable, "-m", "kernelscale.cli", "distill", args.train, "--arch", "fc:depth=3", "--learn-labels",
               "--ipc", str(args.ipc), "--steps", str(args.steps), "--checkpoint-every", str(args.steps),
               "--target-batch", str(args.target_batch), "--workers", "2", "--kss-tile", str(args.kss_tile),
               "--json", "--no-progress", "--overwrite", "--out", args.out]
        seen: dict[str, set[int]] = {}
        import threading

        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for name, proc in nodes.items():
                    for pid in node_pids(proc):
                        try:
                            if "ShardWorker" in " ".join(psutil.Process(pid).cmdline()):
                                seen.setdefault(name, set()).add(pid)
                        except psutil.Error:
                            continue
                time.sleep(0.5)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        os.environ.update(env(RAY_ADDRESS=address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"))
        done, wall, peak = run_measured(cmd, cwd=ROOT)
        stop.set()
        th.join()
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        res.update({"ipc": args.ipc, "support": summary["n_support"], "steps": args.steps,
                    "seconds_per_step": summary["seconds_per_step"], "first_step_seconds": summary["first_step_seconds"],
                    "train_seconds": summary["train_seconds"], "wall_seconds": round(wall, 1),
                    "driver_peak_rss_mib": peak["driver"], "final_loss": summary["final_loss"],
                    "shard_worker_actors_per_node": {k: len(v) for k, v in seen.items()},
                    "command": "RAY_ADDRESS=" + address + " " + " ".join(cmd[1:])})
    finally:
        for name in ("worker", "head"):
            pids = node_pids(nodes[name])
            try:
                os.killpg(nodes[name].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            nodes[name].wait(timeout=30)
    print(json.dumps(res), flush=True)
    if args.json:
        update_json(args.json, two_node=res)


if __name__ == "__main__":
    main()
