"""KIP killed with SIGKILL mid-run and continued with ``--resume`` ends bitwise identical to an uninterrupted run.

    .venv/bin/python benchmarks/kip_kill_resume.py TRAIN.zarr VAL.zarr --ipc 1 --steps 12 --checkpoint-every 3 \\
        --kill-after 6 --work /tmp/kip_kr --json docs/results_kip_imagenet_scale.json

Runs ``kernelscale distill`` (fc NTK, labels learned, K_ss tile-wise over ``--workers`` Ray actors) twice into
two stores: once to the end, once SIGKILLed (``kill -9`` of the driver's whole process group, Ray's processes
included) as soon as its store has committed the checkpoint of step ``--kill-after`` or later, then the same
command with ``--resume``. Compares the final support images, labels, loss/accuracy history and the last
checkpoint's state bitwise (numpy array_equal on the Zarr arrays).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import zarr

from kip_imagenet_scale import update_json

ROOT = Path(__file__).resolve().parents[1]


def committed_checkpoint(out: Path) -> int | None:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"].get("checkpoint")
    except (OSError, ValueError, KeyError):
        return None


def arrays(out: Path) -> dict[str, np.ndarray]:
    """Every array of the final store that a resumed run must reproduce."""
    g = zarr.open_group(str(out), mode="r")
    res = {"x": g["x"][...], "labels": g["labels"][...], "support_rows": g["support_rows"][...]}
    for k in ("loss", "val_step", "val_accuracy"):
        res[f"history/{k}"] = g["history"][k][...]
    step = g.attrs["checkpoint"]
    ck = g["checkpoints"][str(step)]
    for name in sorted(ck.array_keys()):
        res[f"checkpoint/{name}"] = ck[name][...]
    res["steps_done"] = np.asarray(g.attrs["steps_done"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train")
    p.add_argument("val")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--checkpoint-every", type=int, default=3)
    p.add_argument("--kill-after", type=int, default=6, help="kill once this step's checkpoint (or a later one) is committed")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kss-tile", type=int, default=1000)
    p.add_argument("--target-batch", type=int, default=2000)
    p.add_argument("--work", default="/tmp/kernelscale-kip-kill")
    p.add_argument("--json")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "kernelscale.cli", "distill", args.train, "--arch", "fc:depth=3", "--learn-labels",
            "--ipc", str(args.ipc), "--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every),
            "--target-batch", str(args.target_batch), "--workers", str(args.workers), "--kss-tile", str(args.kss_tile),
            "--val", args.val, "--eval-every", str(args.checkpoint_every), "--json", "--no-progress", "--overwrite"]
    full, killed = work / "full.zarr", work / "killed.zarr"
    t0 = time.perf_counter()
    done = subprocess.run(base + ["--out", str(full)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    full_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    log = open(work / "killed_run.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(base + ["--out", str(killed)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    seen: set[int] = set()
    while proc.poll() is None:
        try:
            seen.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        ck = committed_checkpoint(killed)
        if ck is not None and ck >= args.kill_after:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"the run ended (rc {proc.returncode}) before the checkpoint of step {args.kill_after}")
    killed_at = committed_checkpoint(killed)
    kill_time = time.time()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_seconds = time.perf_counter() - t0
    time.sleep(2)
    leftovers = []
    for pid in seen:  # Ray processes the driver started in their own session: only those, by pid
        try:
            q = psutil.Process(pid)
            if q.create_time() > kill_time:  # not one of ours (a reused pid)
                continue
            leftovers.append(q.name())
            q.kill()
        except psutil.Error:
            pass
    t0 = time.perf_counter()
    resumed = subprocess.run(base + ["--out", str(killed), "--resume"], cwd=ROOT, capture_output=True, text=True)
    if resumed.returncode != 0:
        raise RuntimeError(resumed.stderr[-2000:])
    resume_seconds = time.perf_counter() - t0
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    a, b = arrays(full), arrays(killed)
    equal = {k: bool(np.array_equal(a[k], b[k])) and a[k].dtype == b[k].dtype for k in a}
    res = {"equal": all(equal.values()) and set(a) == set(b), "arrays_compared": equal, "ipc": args.ipc,
           "support": int(a["x"].shape[0]), "steps": args.steps, "checkpoint_every": args.checkpoint_every,
           "workers": args.workers, "kss_tile": args.kss_tile,
           "killed_after_checkpoint_of_step": killed_at, "resumed_from_step": summary.get("start_step"),
           "killed_after_seconds": round(kill_seconds, 1), "uninterrupted_seconds": round(full_seconds, 1),
           "resume_seconds": round(resume_seconds, 1), "processes_left_after_kill": leftovers,
           "final_loss": float(a["history/loss"][-1]), "command": " ".join(base[1:]) + " --out OUT [--resume]"}
    print(json.dumps(res), flush=True)
    if args.json:
        update_json(args.json, kill_resume=res)


if __name__ == "__main__":
    main()
