"""KIP default-setting study on a split of TRAIN only (the held-out VAL split is never touched).

    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/kip_tune.py --train TRAIN.zarr \
        --work /tmp/kip_tune --variants default,batch4000 --json out.json

TRAIN (e.g. the 45,000-row CIFAR-10 train split of bench_kip / bench_beyond_ram) is turned back into pixels
(the store's affine map inverted to [0, 1], rounded to uint8) and re-ingested with its own stratified split, 40,000
tune-train / 5,000 tune-holdout rows (seed 12345), per-channel standardisation from tune-train. Each variant is
one `kernelscale distill` run (fc depth-3 NTK, 10 images per class, labels learned, reg 1e-6) evaluated on the
tune-holdout every 1,000 steps; the JSON has each variant's wall time and accuracy history.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [str(Path(sys.executable).parent / "kernelscale")]
BASE = ["--arch", "fc:depth=3", "--kernel", "ntk", "--ipc", "10", "--learn-labels", "--reg", "1e-6"]
VARIANTS = {
    "default": [],
    # session 3: the defaults before target augmentation (4,000 steps, no augmentation) and the study's variants
    "old_default": ["--steps", "4000", "--target-augment", "none"],
    "shift2_4000": ["--steps", "4000", "--target-augment", "shift=2"],
    "shift2_flip_4000": ["--steps", "4000", "--target-augment", "shift=2,flip"],
    "flip_4000": ["--steps", "4000", "--target-augment", "flip"],
    "shift2_8000": ["--steps", "8000", "--target-augment", "shift=2"],
    "none_8000": ["--steps", "8000", "--target-augment", "none"],
    "b_std0_4000": ["--arch", "fc:depth=3,b_std=0", "--steps", "4000", "--target-augment", "none"],
    "b_std0.5_4000": ["--arch", "fc:depth=3,b_std=0.5", "--steps", "4000", "--target-augment", "none"],
    "steps8000": ["--steps", "8000"],
    "batch4000": ["--target-batch", "4000"],
    "steps8000_batch4000": ["--steps", "8000", "--target-batch", "4000"],
    "lr0.02": ["--lr", "0.02"],
    "lr0.005": ["--lr", "0.005"],
    "label_lr0.05": ["--label-lr", "0.05"],
    "label_lr0.002": ["--label-lr", "0.002"],
}


def tune_split(train: str, work: Path) -> tuple[str, str]:
    """(tune-train, tune-holdout) stores carved from TRAIN's rows only."""
    from kernelscale.data import ingest, open_dataset

    tt, th = work / "tune_train.zarr", work / "tune_holdout.zarr"
    if tt.exists() and th.exists():
        return str(tt), str(th)
    store = open_dataset(train)
    pixels = store.affine.invert(store.rows(0, store.n))
    npz = work / "train_pixels.npz"
    np.savez(npz, images=np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8), labels=store.labels)
    ingest(str(npz), str(tt), val_fraction=5000 / store.n, val_out=str(th), seed=12345, preprocess="standardize",
           overwrite=True, progress=False)
    return str(tt), str(th)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True)
    p.add_argument("--work", default="/tmp/kip_tune")
    p.add_argument("--variants", default="default", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--json")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tt, th = tune_split(args.train, work)
    results = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    for name in args.variants.split(","):
        out = work / f"kip_{name}_s{args.seed}.zarr"
        if out.exists():
            shutil.rmtree(out)
        cmd = CLI + ["distill", tt] + BASE + VARIANTS[name] + [
            "--seed", str(args.seed), "--val", th, "--eval-every", "1000", "--out", str(out), "--json", "--no-progress"]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{name}: distill failed ({done.returncode})")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        summary["wall_s"] = round(time.perf_counter() - t, 1)
        results[f"{name}_s{args.seed}"] = summary
        print(name, json.dumps({k: summary.get(k) for k in ("wall_s", "val_accuracy", "history", "seconds")}, default=str),
              flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
