"""Convolutional vs fully-connected NTK on CIFAR-10 at full resolution (32x32): kernel regression accuracy,
time, and sample complexity (fitted learning-curve slopes with confidence intervals).

    .venv/bin/python benchmarks/cnn_experiments.py --work /tmp/cnn --train 2000 --test 1000 \\
        --out docs/results_cnn.json --img docs/img

Everything runs through kernelscale's own commands: ``ingest`` (a class-stratified held-out split of the
CIFAR-10 training folder, per-channel standardised), ``gram`` (train Gram and cross Gram, native kernels),
and ``curve`` (kernel ridge regression on nested class-balanced subsets of the stored Grams, several subset
orders). The slope b of test error ~ a n^b is fitted per subset order; its mean and a 95% t-interval over
the orders are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"
KS = [sys.executable, "-m", "kernelscale.cli"]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def ks(*args: str) -> dict:
    """Run one kernelscale command with --json and return its summary (raises on failure)."""
    t = time.perf_counter()
    proc = subprocess.run([*KS, *args, "--json", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    print(f"  {' '.join(args[:2])} ... {time.perf_counter() - t:.1f} s", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(sizes: list[int], acc: list[float]) -> float:
    """Fitted exponent b of test error ~ a * n^b."""
    err = np.maximum(1 - np.asarray(acc, float), 1e-4)
    return float(np.polyfit(np.log(sizes), np.log(err), 1)[0])


def plot(res: dict, path: Path) -> None:
    """Held-out error against training rows, log-log, one line per kernel with its fitted slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for name, r in res["kernels"].items():
        ax.loglog(r["sizes"], 1 - np.asarray(r["accuracy_mean"]), "o-",
                  label=f"{name} NTK (slope {r['slope_mean']:.3f} +- {r['slope_ci95']:.3f})")
    ax.set_xticks(res["kernels"][next(iter(res["kernels"]))]["sizes"])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training rows (CIFAR-10, 32x32)")
    ax.set_ylabel(f"held-out error ({res['test_rows']} rows)")
    ax.set_title("convnet-3 vs fc-3 NTK, kernel regression")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/kernelscale-cnn")
    p.add_argument("--train", type=int, default=2000, help="training rows")
    p.add_argument("--test", type=int, default=1000, help="held-out rows")
    p.add_argument("--orders", type=int, default=5, help="subset orders (seeds) of the learning curve")
    p.add_argument("--archs", default="convnet:depth=3,fc:depth=3")
    p.add_argument("--out", default=str(ROOT / "docs" / "results_cnn.json"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img"))
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from --out")
    args = p.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.img) / "curve_cifar10_32x32.png")
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    n = args.train + args.test
    train, val = str(work / "train.zarr"), str(work / "val.zarr")
    if not Path(train).exists():
        ks("ingest", str(CIFAR), train, "--val-out", val, "--val-fraction", f"{args.test / n:.6f}", "--limit", str(n),
           "--preprocess", "standardize")
    sizes = [s for s in (125, 250, 500, 1000, 2000, 4000, 8000) if s <= args.train]
    if sizes[-1] != args.train:
        sizes.append(args.train)
    res: dict = {"train_rows": args.train, "test_rows": args.test, "resolution": "32x32", "kernels": {}}
    for arch in args.archs.split(","):
        name = arch.split(":")[0]
        gram, cross = str(work / f"{name}_gram.zarr"), str(work / f"{name}_cross.zarr")
        g = ks("gram", train, "--arch", arch, "--kernel", "ntk", "--out", gram)
        c = ks("gram", val, "--against", train, "--arch", arch, "--kernel", "ntk", "--out", cross)
        curves = [ks("curve", gram, "--data", train, "--cross", cross, "--test", val, "--sizes",
                     ",".join(map(str, sizes)), "--seed", str(seed)) for seed in range(args.orders)]
        acc = np.array([cv["accuracy"] for cv in curves])
        slopes = np.array([slope(sizes, a) for a in acc])
        half = T95.get(len(slopes) - 1, 1.96) * slopes.std(ddof=1) / np.sqrt(len(slopes)) if len(slopes) > 1 else float("nan")
        res["kernels"][name] = {
            "arch": arch, "sizes": sizes, "accuracy_mean": acc.mean(axis=0).round(4).tolist(),
            "accuracy_full": float(acc[0, -1]), "slope_mean": float(slopes.mean()), "slope_ci95": float(half),
            "slopes": slopes.round(4).tolist(), "gram_seconds": g["seconds"], "cross_seconds": c["seconds"],
            "pairs_per_s": round((args.train * (args.train + 1) / 2 + args.train * args.test)
                                 / (g["seconds"] + c["seconds"]), 1)}
        print(json.dumps(res["kernels"][name]), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    plot(res, Path(args.img) / "curve_cifar10_32x32.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
