"""Convolutional vs fully-connected NTK on CIFAR-10 at full resolution (32x32): kernel regression accuracy,
time, and sample complexity (fitted learning-curve slopes with confidence intervals).

    .venv/bin/python benchmarks/cnn_experiments.py --work /tmp/cnn --train 2000 --test 1000 \\
        --out docs/results_cnn.json --img docs/img

Everything runs through kernelscale's own commands: ``ingest`` (a class-stratified held-out split of the
CIFAR-10 training folder, per-channel standardised), ``gram`` (train Gram and cross Gram, native kernels),
and ``curve`` (kernel ridge regression on nested class-balanced subsets of the stored Grams, several subset
orders). The slope b of test error ~ a n^b is fitted per subset order; its mean and a 95% t-interval over
the orders are reported.

On a machine with an accelerator but without Ray or the source folder, the same experiment runs in one process:
``--export rows.npz`` (here) writes the ingested rows as uint8 pixels with their preprocessing (~3 KB per row), and
``--in-process rows.npz`` (there) computes both Grams with the native JAX kernel on JAX's default backend, in
fixed-size blocks (diagonal blocks through the symmetric call, exact diagonal), and runs the same learning curve
(:func:`kernelscale.krr.curve_arrays`, which ``curve`` uses) on them.
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
    sizes = res["kernels"][next(iter(res["kernels"]))]["sizes"]
    ticks = [s for s, nxt in zip(sizes, sizes[1:]) if nxt >= 1.5 * s] + sizes[-1:]  # no overlapping labels
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training rows (CIFAR-10, 32x32)")
    ax.set_ylabel(f"held-out error ({res['test_rows']} rows)")
    where = f", {res['device']}" if res.get("backend") not in (None, "cpu") else ""
    ax.set_title(f"convnet-3 vs fc-3 NTK, kernel regression{where}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export_rows(train: str, val: str, path: Path) -> None:
    """The ingested rows as uint8 pixels plus their per-channel standardisation; checks the round trip is exact."""
    from kernelscale.data import open_dataset

    out: dict[str, np.ndarray] = {}
    for name, store in (("train", train), ("val", val)):
        ds = open_dataset(store)
        x = ds.rows(0, ds.n)
        aff = ds.affine
        pixels = np.clip(np.round(aff.invert(x) * 255.0), 0, 255).astype(np.uint8)
        again = np.asarray(aff.apply(pixels.astype(np.float32) / 255.0), np.float32)
        if not np.array_equal(again, x):
            raise SystemExit(f"{store}: uint8 round trip is not exact (max diff {np.abs(again - x).max():.3g})")
        out |= {f"{name}_pixels": pixels, f"{name}_labels": ds.labels.astype(np.int64)}
        out |= {"mean": np.asarray(aff.mean, np.float32), "scale": np.asarray(aff.scale, np.float32)}
    np.savez(path, **out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def load_rows(path: str | Path) -> dict[str, np.ndarray]:
    """An ``--export`` file as model inputs: ``train_x``/``val_x`` (n, H, W, C) float32, the ingested stores' values
    ((pixels / 255 - mean) * scale), and ``train_labels``/``val_labels``."""
    rows = np.load(path)
    prep = lambda p: ((p.astype(np.float32) / 255.0 - rows["mean"]) * rows["scale"]).astype(np.float32)  # noqa: E731
    return {"train_x": prep(rows["train_pixels"]), "train_labels": rows["train_labels"],
            "val_x": prep(rows["val_pixels"]), "val_labels": rows["val_labels"]}


def gram_in_process(spec, x: np.ndarray, x2: np.ndarray | None = None, block: int = 1000) -> tuple[np.ndarray, float]:
    """K(x, x) (symmetric blocks, exact diagonal) or K(x, x2) with the native JAX kernel on the default backend, in
    ``block``-row blocks (rows padded to a multiple of ``block``: one compilation). Returns (K, seconds)."""
    import jax
    from kernelscale.kernels import native

    fn = native.kernel_fn(spec)
    sym = jax.jit(lambda a: fn(a, None, spec.kernel))
    blk = jax.jit(lambda a, b: fn(a, b, spec.kernel))
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], -len(a) % block, axis=0)])  # noqa: E731
    xa = pad(x)
    xb = xa if x2 is None else pad(x2)
    nb_a, nb_b = len(xa) // block, len(xb) // block
    out = np.zeros((len(xb), len(xa)), np.float32)
    blk(xa[:block], xa[:block]).block_until_ready()  # compile outside the timing
    if x2 is None:
        sym(xa[:block]).block_until_ready()
    t = time.perf_counter()
    for i in range(nb_b):
        for j in range(nb_a):
            if x2 is None and j < i:
                continue
            bi, bj = xb[i * block : (i + 1) * block], xa[j * block : (j + 1) * block]
            k = np.asarray(sym(bi) if (x2 is None and i == j) else blk(bi, bj))
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] = k
            if x2 is None and j > i:
                out[j * block : (j + 1) * block, i * block : (i + 1) * block] = k.T
    seconds = time.perf_counter() - t
    return out[: len(x2) if x2 is not None else len(x), : len(x)], seconds


def run_in_process(args: argparse.Namespace) -> dict:
    """The experiment on an exported rows file, everything in this process (any JAX backend)."""
    import jax
    from kernelscale.kernels import parse_arch
    from kernelscale.krr import curve_arrays, nested_order

    rows = load_rows(args.in_process)
    # fewer rows than exported: a class-balanced subset (the stores are written class by class)
    tr = np.sort(nested_order(rows["train_labels"], 0)[: args.train])
    te = np.sort(nested_order(rows["val_labels"], 0)[: args.test])
    xtr, ytr = rows["train_x"][tr], rows["train_labels"][tr]
    xte, yte = rows["val_x"][te], rows["val_labels"][te]
    sizes = [s for s in (125, 250, 500, 1000, 2000, 4000, 8000) if s <= len(xtr)]
    if not sizes or sizes[-1] != len(xtr):
        sizes.append(len(xtr))
    res: dict = {"train_rows": len(xtr), "test_rows": len(xte), "resolution": "x".join(map(str, xtr.shape[1:3])),
                 "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "kernels": {}}
    for arch in args.archs.split(","):
        name = arch.split(":")[0]
        spec = parse_arch(arch, "ntk")
        k_train, g_s = gram_in_process(spec, xtr, block=args.block)
        k_cross, c_s = gram_in_process(spec, xtr, xte, block=args.block)
        curves = []
        for seed in range(args.orders):
            order = nested_order(ytr, seed)
            curves.append(curve_arrays(k_train[np.ix_(order, order)].astype(np.float64), k_cross[:, order].astype(np.float64),
                                       ytr[order], yte, 10, sizes, seed=seed))
        acc = np.array([cv["accuracy"] for cv in curves])
        slopes = np.array([slope(sizes, a) for a in acc])
        half = T95.get(len(slopes) - 1, 1.96) * slopes.std(ddof=1) / np.sqrt(len(slopes)) if len(slopes) > 1 else float("nan")
        pairs = len(xtr) * (len(xtr) + 1) / 2 + len(xtr) * len(xte)
        res["kernels"][name] = {
            "arch": arch, "sizes": sizes, "accuracy_mean": acc.mean(axis=0).round(4).tolist(),
            "accuracy_full": float(acc[0, -1]), "slope_mean": float(slopes.mean()), "slope_ci95": float(half),
            "slopes": slopes.round(4).tolist(), "gram_seconds": round(g_s, 2), "cross_seconds": round(c_s, 2),
            "pairs_per_s": round(pairs / (g_s + c_s), 1)}
        print(json.dumps(res["kernels"][name]), flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")  # each kernel as it lands
    return res


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
    p.add_argument("--export", metavar="ROWS.npz", help="after ingest, write the rows as uint8 pixels and stop")
    p.add_argument("--in-process", metavar="ROWS.npz", help="run everything in this process on an exported rows file")
    p.add_argument("--block", type=int, default=1000, help="rows per kernel call with --in-process")
    args = p.parse_args()
    if args.in_process:
        res = run_in_process(args)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        plot(res, Path(args.img) / "curve_cifar10_32x32.png")
        return 0
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
    if args.export:
        export_rows(train, val, Path(args.export))
        return 0
    sizes = [s for s in (125, 250, 500, 1000, 2000, 4000, 8000) if s <= args.train]
    if not sizes or sizes[-1] != args.train:
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
