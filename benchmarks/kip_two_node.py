"""KIP with 1,000 classes on a 2-node Ray cluster on this machine (loopback): step time, and which node ran
each target-shard actor.

    .venv/bin/python benchmarks/kip_two_node.py TRAIN.zarr --ipc 1 --steps 20 \\
        --json docs/results_kip_imagenet_scale.json

Starts a head and a second node, 1 CPU each, on 127.0.0.1 (:class:`kernelscale.loopback_cluster.LoopbackCluster`:
``ray start --block`` processes in their own process groups, temp dirs under ``--root``, token authentication
on), runs ``RAY_ADDRESS=127.0.0.1:PORT kernelscale distill ... --workers 2 --kss-tile 1000`` (two 1-CPU actors:
one per node), watches the nodes' process trees for the ShardWorker actors, and kills the two nodes (their own
process groups only: ``ray stop`` would stop every Ray instance of the user on the machine).
"""

from __future__ import annotations

import argparse
import sys
import json
import os
import threading
import time
from pathlib import Path

from kip_imagenet_scale import update_json
from measure import run_measured

from kernelscale.loopback_cluster import LoopbackCluster

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--target-batch", type=int, default=2000)
    p.add_argument("--kss-tile", type=int, default=1000)
    p.add_argument("--root", default="/tmp/kip2n", help="the nodes' temp dirs and logs (keep it short)")
    p.add_argument("--out", default="/tmp/kip_2node.zarr")
    p.add_argument("--json")
    args = p.parse_args()
    res: dict = {}
    os.makedirs(args.root, exist_ok=True)
    with LoopbackCluster(args.root) as cluster:
        cluster.start_head()
        cluster.start_worker("worker")
        cluster.wait_for_nodes(2)
        res.update(address=cluster.address, nodes_alive=cluster.alive_nodes())
        cmd = [sys.executable, "-m", "kernelscale.cli", "distill", args.train, "--arch", "fc:depth=3", "--learn-labels",
               "--ipc", str(args.ipc), "--steps", str(args.steps), "--checkpoint-every", str(args.steps),
               "--target-batch", str(args.target_batch), "--workers", "2", "--kss-tile", str(args.kss_tile),
               "--json", "--no-progress", "--overwrite", "--out", args.out]
        seen: dict[str, set[int]] = {}
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                for name in cluster.nodes:
                    if pids := cluster.processes_running(name, "ShardWorker"):
                        seen.setdefault(name, set()).update(pids)
                time.sleep(0.5)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        os.environ.update(cluster.env(RAY_ADDRESS=cluster.address))
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
                    "command": "RAY_ADDRESS=" + cluster.address + " " + " ".join(cmd[1:])})
    print(json.dumps(res), flush=True)
    if args.json:
        update_json(args.json, two_node=res)


if __name__ == "__main__":
    main()
