"""KIP with 1,000 classes at ImageNet shape: step time, peak memory per process, checkpoint size and time, and
held-out accuracy in a fixed budget, for supports of 1,000 to 10,000 images (1 to 10 per class).

    .venv/bin/python benchmarks/kip_imagenet_scale.py TRAIN.zarr VAL.zarr --ipc 1,2,5,10 --budget 600 \\
        --work /tmp/kip1k --json docs/results_kip_imagenet_scale.json

TRAIN.zarr / VAL.zarr: stores ingested from ``benchmarks/imagenet_like.py``'s folder (synthetic data: the
accuracies are not ImageNet results). Per support size it first times a short run (``--probe-steps`` steps), then
runs ``kernelscale distill`` (fc NTK, labels learned, K_ss tile-wise over ``--workers`` actors with
``--kss-tile``) for as many steps as fit in ``--budget`` seconds, with a checkpoint at the end and held-out
accuracy at the start and the end. Memory is the peak resident set of each process of the run (driver and Ray
workers), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from measure import run_measured

ROOT = Path(__file__).resolve().parents[1]


def run_distill(cmd: list[str]) -> tuple[dict, float, dict[str, float]]:
    """Run a kernelscale command with --json: (its summary, wall seconds, peak RSS in MiB per process kind)."""
    done, wall, peak = run_measured(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:5])} failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall, peak


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def update_json(path: str | Path, **sections) -> None:
    """Write ``sections`` into the results JSON at ``path``, keeping the sections other benchmarks wrote there."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(sections)
    path.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train")
    p.add_argument("val")
    p.add_argument("--ipc", default="1,2,5,10", help="support images per class (comma-separated)")
    p.add_argument("--target-batch", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kss-tile", type=int, default=1000)
    p.add_argument("--budget", type=float, default=600, help="seconds of KIP steps per support size")
    p.add_argument("--probe-steps", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=0, help="at most this many steps per size (0: no cap)")
    p.add_argument("--arch", default="fc:depth=3")
    p.add_argument("--work", default="/tmp/kernelscale-kip1k")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ks = [sys.executable, "-m", "kernelscale.cli", "distill", args.train, "--arch", args.arch, "--learn-labels",
          "--target-batch", str(args.target_batch), "--workers", str(args.workers), "--kss-tile", str(args.kss_tile),
          "--json", "--no-progress", "--overwrite"]
    results = []
    for ipc in [int(v) for v in args.ipc.split(",")]:
        probe_out = work / f"probe_ipc{ipc}.zarr"
        for old in (probe_out, work / f"ipc{ipc}.zarr"):  # this script's own outputs of an earlier run
            shutil.rmtree(old, ignore_errors=True)
        probe, probe_wall, _ = run_distill(ks + ["--ipc", str(ipc), "--steps", str(args.probe_steps),
                                                  "--checkpoint-every", str(args.probe_steps), "--out", str(probe_out)])
        step_s = probe["seconds_per_step"]
        steps = max(args.probe_steps, int(args.budget / step_s))
        if args.max_steps:
            steps = min(steps, args.max_steps)
        out = work / f"ipc{ipc}.zarr"
        run, wall, peak = run_distill(ks + ["--ipc", str(ipc), "--steps", str(steps), "--checkpoint-every", str(steps),
                                             "--val", args.val, "--eval-every", str(steps), "--out", str(out)])
        row = {"ipc": ipc, "support": run["n_support"], "steps": steps, "seconds_per_step": run["seconds_per_step"],
               "first_step_seconds": run["first_step_seconds"], "comm_seconds_per_step": run["comm_seconds_per_step"],
               "train_seconds": run["train_seconds"], "wall_seconds": round(wall, 1), "peak_rss_mib": peak,
               "checkpoint_bytes": dir_bytes(out / "checkpoints") if (out / "checkpoints").exists() else None,
               "checkpoint_seconds": run.get("checkpoint_seconds"),
               "val_accuracy_init": run["val_accuracy_init"], "val_accuracy": run["val_accuracy"],
               "target_bytes_read_per_row": run.get("target_bytes_read_per_row"),
               "probe": {"steps": args.probe_steps, "seconds_per_step": step_s, "wall_seconds": round(probe_wall, 1)}}
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            update_json(args.json, train=args.train, val=args.val, arch=args.arch, target_batch=args.target_batch,
                        workers=args.workers, kss_tile=args.kss_tile, budget_seconds=args.budget, runs=results)


if __name__ == "__main__":
    main()
