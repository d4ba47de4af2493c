"""The seed's three checks as one script: finite-width validation, transfer to finite networks, sample complexity.

    .venv/bin/python benchmarks/seed_experiments.py --work /tmp/seed --out docs/results_seed.json --img docs/img

Everything runs through kernelscale's own commands (ingest, validate-width, gram, curve, distill, train-finite)
on mnist5k (embedded) and CIFAR-10 (../shared/data/cifar10/train, held-out split from --val-fraction), at
sizes a 2-core CPU finishes in minutes; the sizes are printed with every result. Writes a JSON of all numbers
and PNG plots; docs/results.md is written from them by hand (with the command above).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"
KS = [sys.executable, "-m", "kernelscale.cli"]


def ks(*args: str) -> dict:
    """Run one kernelscale command with --json and return its summary (raises on failure)."""
    cmd = [*KS, *args, "--json", "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {' '.join(args[:2])} ... {time.perf_counter() - t:.1f} s", flush=True)
    return out


def ingest(src: str, work: Path, name: str, *extra: str) -> tuple[str, str]:
    train, val = str(work / f"{name}_train.zarr"), str(work / f"{name}_val.zarr")
    if not Path(train).exists():
        ks("ingest", src, train, "--val-out", val, "--preprocess", "standardize", "--overwrite", *extra)
    return train, val


def slope(sizes: list[int], acc: list[float]) -> float:
    """Fitted exponent b of test error ~ a * n^b."""
    err = np.maximum(1 - np.asarray(acc, float), 1e-4)
    return float(np.polyfit(np.log(sizes), np.log(err), 1)[0])


def plot(path: Path, series: list[tuple[str, list, list]], xlabel: str, ylabel: str, loglog: bool = False) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, x, y in series:
        (ax.loglog if loglog else ax.semilogx)(x, y, "o-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def width_check(res: dict, work: Path, img: Path, mnist: tuple[str, str], cifar: tuple[str, str] | None) -> None:
    print("finite-width validation", flush=True)
    # widths stop at 2048: at 4096 the empirical NTK of 32 CIFAR rows with 10 outputs went past 18 GB here
    runs = {"mnist fc:depth=3": ("fc:depth=3", mnist[0], "64,256,1024,2048")}
    if cifar:
        runs["cifar10 fc:depth=3"] = ("fc:depth=3", cifar[0], "64,256,1024,2048")
    out = {}
    for label, (arch, data, widths) in runs.items():
        out[label] = ks("validate-width", "--data", data, "--arch", arch, "--widths", widths, "--rows", "32",
                        "--seeds", "2", "--drift-steps", "100",
                        "--plot", str(img / f"width_{label.split()[0]}_{arch.split(':')[0]}.png"))
    res["width"] = {k: {f: v[f] for f in ("widths", "errors", "drift", "slope", "drift_slope", "rows", "seeds",
                                        "seconds", "plot")} for k, v in out.items()}


def transfer(res: dict, work: Path, img: Path, datasets: dict[str, tuple[str, str]], steps: int) -> None:
    print("transfer to finite networks", flush=True)
    rows = {}
    for name, (train, val) in datasets.items():
        for kind in ("random", "kip"):
            out = str(work / f"{name}_{kind}_support.zarr")
            if not Path(out).exists():
                ks("distill", train, "--arch", "fc:depth=3", "--ipc", "10", "--steps",
                   "0" if kind == "random" else str(steps), "--learn-labels", "--out", out)
            r = ks("train-finite", out, "--test", val, "--width", "1024", "--epochs", "500")
            rows[f"{name} {kind}"] = {k: r[k] for k in ("accuracy", "kernel_accuracy", "gap", "train_accuracy",
                                                        "width", "epochs", "n_support")}
    res["transfer"] = rows | {"kip_steps": steps}
    res["transfer_plot"] = plot_transfer(rows, img / "transfer.png")


def plot_transfer(rows: dict, path: Path) -> str:
    """Grouped bars: kernel vs finite-network held-out accuracy per support set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in rows if isinstance(rows[k], dict)]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(x - 0.2, [rows[k]["kernel_accuracy"] for k in names], 0.4, label="kernel regression")
    ax.bar(x + 0.2, [rows[k]["accuracy"] for k in names], 0.4, label="finite network (width 1024)")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sample_complexity(res: dict, work: Path, img: Path, curves: dict[str, dict]) -> None:
    print("sample complexity", flush=True)
    out = {}
    for label, cfg in curves.items():
        train, val, arch = cfg["train"], cfg["val"], cfg["arch"]
        gram, cross = str(work / f"{label}_gram.zarr"), str(work / f"{label}_cross.zarr")
        g = ks("gram", train, "--arch", arch, "--kernel", "ntk", "--out", gram)
        c = ks("gram", val, "--against", train, "--arch", arch, "--kernel", "ntk", "--out", cross)
        r = ks("curve", gram, "--data", train, "--cross", cross, "--test", val, "--sizes",
               ",".join(str(s) for s in cfg["sizes"]))
        out[label] = {"sizes": r["sizes"], "accuracy": r["accuracy"], "slope": slope(r["sizes"], r["accuracy"]),
                      "arch": arch, "train_rows": cfg["n_train"], "test_rows": cfg["n_test"],
                      "gram_seconds": g["seconds"] + c["seconds"], "resolution": cfg["resolution"]}
    res["curves"] = out
    for ds in ("mnist", "cifar10"):
        series = [(f"{k} (slope {v['slope']:.2f})", v["sizes"], [1 - a for a in v["accuracy"]])
                  for k, v in out.items() if k.startswith(ds)]
        if series:
            res[f"curves_{ds}_plot"] = plot(img / f"curve_{ds}.png", series, "training rows", "test error",
                                            loglog=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/kernelscale-seed")
    p.add_argument("--out", default=str(ROOT / "docs" / "results_seed.json"))
    p.add_argument("--img", default=str(ROOT / "docs" / "img"))
    p.add_argument("--kip-steps", type=int, default=1000)
    p.add_argument("--skip", default="", help="comma list of width,transfer,curves to skip")
    args = p.parse_args()
    work, img = Path(args.work), Path(args.img)
    work.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    res: dict = {"machine": f"{os.cpu_count()} CPU cores, no GPU"}
    t0 = time.perf_counter()

    mnist = ingest("mnist5k", work, "mnist", "--val-fraction", "0.2")
    mnist8 = ingest("mnist5k", work, "mnist8", "--val-fraction", "0.25", "--resize", "8x8", "--limit", "600")
    cifar = ingest(str(CIFAR), work, "cifar", "--val-fraction", "0.1", "--limit", "12000") if CIFAR.is_dir() else None
    cifar8 = (ingest(str(CIFAR), work, "cifar8", "--val-fraction", "0.25", "--resize", "8x8", "--limit", "600")
              if CIFAR.is_dir() else None)

    if "width" not in skip:
        width_check(res, work, img, mnist, cifar)
    if "transfer" not in skip:
        transfer(res, work, img, {"mnist": mnist} | ({"cifar10": cifar} if cifar else {}), args.kip_steps)
    if "curves" not in skip:
        curves = {
            "mnist fc (28x28)": dict(train=mnist[0], val=mnist[1], arch="fc:depth=3", n_train=4000, n_test=1000,
                                     sizes=[125, 250, 500, 1000, 2000, 4000], resolution="28x28"),
            "mnist fc (8x8)": dict(train=mnist8[0], val=mnist8[1], arch="fc:depth=3", n_train=450, n_test=150,
                                   sizes=[50, 100, 200, 450], resolution="8x8"),
            "mnist convnet (8x8)": dict(train=mnist8[0], val=mnist8[1], arch="convnet:depth=2", n_train=450,
                                        n_test=150, sizes=[50, 100, 200, 450], resolution="8x8"),
        }
        if cifar:
            curves["cifar10 fc (32x32)"] = dict(train=cifar[0], val=cifar[1], arch="fc:depth=3", n_train=10800,
                                                n_test=1200, sizes=[300, 1000, 3000, 10000], resolution="32x32")
            curves["cifar10 fc (8x8)"] = dict(train=cifar8[0], val=cifar8[1], arch="fc:depth=3", n_train=450,
                                              n_test=150, sizes=[50, 100, 200, 450], resolution="8x8")
            curves["cifar10 convnet (8x8)"] = dict(train=cifar8[0], val=cifar8[1], arch="convnet:depth=2",
                                                   n_train=450, n_test=150, sizes=[50, 100, 200, 450],
                                                   resolution="8x8")
        sample_complexity(res, work, img, curves)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
