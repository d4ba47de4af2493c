"""Robustness experiments (issue 6): random support vs KIP vs Adversarial KIP, gradient-masking checks, and
"robust needs more data" learning curves. Writes docs/robustness/<part>.json and PNG plots.

    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/robust_experiments.py --part mnist
    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/robust_experiments.py --part cifar
    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/robust_experiments.py --part curve

Stores go under --work (reused when present: delete it to recompute). Step counts and test sizes are reduced to
fit a 2-core machine; every knob is a flag and is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT.parent / "shared" / "data" / "cifar10" / "train"
OUT_DIR = ROOT / "docs" / "robustness"

DATASETS = {
    # name: (source, ingest kwargs, eps grid (linf, pixels), training eps of adversarial KIP)
    "mnist": ("mnist5k", {"val_fraction": 0.2}, [0, 0.05, 0.1, 0.2], 0.1),
    "cifar": (str(CIFAR_DIR), {"val_fraction": 0.1}, [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255], 4 / 255),
}


def eps_text(e: float) -> str:
    f = Fraction(e).limit_denominator(255)
    return f"{float(f):.4g}" if f.denominator not in (255,) else f"{f.numerator}/255"


def ingest_pair(name: str, work: Path) -> tuple[str, str]:
    from kernelscale.data import ingest

    src, kw, *_ = DATASETS[name]
    train, val = work / f"{name}_train.zarr", work / f"{name}_val.zarr"
    if not train.exists():
        ingest(src, str(train), val_out=str(val), preprocess="standardize", progress=False, **kw)
    return str(train), str(val)


def support_predictor(path: str, arch: str | None = None, kernel: str | None = None):
    """KernelPredictor of a distilled support (optionally with another kernel: transfer surrogate)."""
    import jax.numpy as jnp

    from kernelscale.kip.store import open_distilled
    from kernelscale.kernels import KernelSpec, parse_arch
    from kernelscale.kip.step import krr_weights
    from kernelscale.kip.sharding import pair_kernel
    from kernelscale.attack.kernel_pgd import KernelPredictor

    store = open_distilled(path)
    spec = KernelSpec.from_json(store.attrs["spec"])
    if arch is not None:
        spec = parse_arch(arch, kernel or spec.kernel)
    x, y = store.support()
    kern = pair_kernel(spec)
    w = krr_weights(kern(jnp.asarray(x), jnp.asarray(x)), jnp.asarray(y), float(store.attrs["reg"]))
    return KernelPredictor(kern, x, np.asarray(w), chunk=len(x))


def run_supports(name: str, args: argparse.Namespace, work: Path) -> dict:
    from kernelscale.kip.run import distill
    from kernelscale.attack.kernel_pgd import Attack, attack_rows, pgd
    from kernelscale.data import open_dataset

    train, val = ingest_pair(name, work)
    grid, eps_train = DATASETS[name][2], DATASETS[name][3]
    common = dict(arch=args.arch, ipc=args.ipc, target_batch=args.target_batch, seed=0, progress=False,
                  checkpoint_every=10_000, eval_every=10_000)
    runs = {"random": dict(steps=0), "kip": dict(steps=args.kip_steps),
            "adv_kip": dict(steps=args.kip_steps, adversarial=f"linf:{eps_train!r}", pgd_steps=args.train_pgd_steps)}
    test = open_dataset(val)
    n = min(args.test_limit, test.n)
    pixels = np.clip(test.affine.invert(test.rows(0, n)), 0, 1)
    labels = test.labels[:n]
    out: dict = {"dataset": name, "train": train, "test": val, "settings": vars(args) | {"eps_train": eps_train},
                 "supports": {}}
    for kind, kw in runs.items():
        path = work / f"{name}_{kind}.zarr"
        t0 = time.perf_counter()
        if not path.exists():
            s = distill(train, out=str(path), **common, **kw)
            out["supports"][kind] = {"train_seconds": s["train_seconds"], "seconds_per_step": s["seconds_per_step"]}
        else:
            out["supports"][kind] = {"train_seconds": None, "note": "reused"}
        rows = []
        predictor = support_predictor(str(path))  # what `kernelscale evaluate --attack` builds, once for all eps
        for e in grid:
            a = Attack("linf", float(e), steps=args.pgd_steps)
            r = attack_rows(predictor, test.affine.apply, pixels, labels, a, batch=100, seed=0)
            rows.append({"eps": e, "accuracy": float(r["clean"].mean()), "robust_accuracy": float(r["robust"].mean()),
                         "noise_accuracy": float(r["noise"].mean())})
        out["supports"][kind]["eps"] = rows
        out["supports"][kind]["eval_seconds"] = round(time.perf_counter() - t0, 1)
        print(kind, json.dumps(rows), flush=True)

    # -- gradient-masking checks at the training eps: many restarts / more steps, and transfer attacks --------
    checks = {}
    for kind in ("kip", "adv_kip"):
        path = str(work / f"{name}_{kind}.zarr")
        target = support_predictor(path)
        res = {}
        strong = Attack("linf", eps_train, steps=args.strong_steps, restarts=args.restarts)
        rows = attack_rows(target, test.affine.apply, pixels, labels, strong, batch=100, seed=11)
        res[f"pgd {args.strong_steps} steps x {args.restarts} restarts"] = float(rows["robust"].mean())
        worst = rows["robust"].copy()
        a = Attack("linf", eps_train, steps=args.pgd_steps)
        for arch, kernel in (("fc:depth=1", "ntk"), (args.arch, "nngp")):
            surrogate = support_predictor(path, arch, kernel)
            adv = np.concatenate([pgd(surrogate, test.affine.apply, pixels[s:s + 100], labels[s:s + 100], a, seed=s)
                                  for s in range(0, n, 100)])
            ok = np.asarray(target(test.affine.apply(adv))).argmax(1) == labels
            res[f"transfer from {arch} {kernel}"] = float(ok.mean())
            worst &= ok
        res["worst case over all attacks (per row)"] = float(worst.mean())
        checks[kind] = res
        print(kind, "checks", json.dumps(res), flush=True)
    out["masking_checks"] = {"eps": eps_train, **checks}
    plot_supports(name, out)
    return out


def plot_supports(name: str, out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    scale = 255 if name == "cifar" else 1
    for i, (kind, label) in enumerate((("random", "random support"), ("kip", "KIP"), ("adv_kip", "Adversarial KIP"))):
        rows = out["supports"][kind]["eps"]
        e = [r["eps"] * scale for r in rows]
        ax.plot(e, [r["robust_accuracy"] for r in rows], "o-", color=f"C{i}", label=f"{label} (PGD)")
        ax.plot(e, [r["noise_accuracy"] for r in rows], ":", color=f"C{i}", alpha=0.6)
    ax.set_xlabel("linf eps" + (" (x/255)" if scale == 255 else " (pixels in [0,1])"))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{name}: fc NTK, {out['settings']['ipc']} img/class (dotted: random noise)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT_DIR / f"{name}_supports.png", dpi=90)
    plt.close(fig)


def run_curve(args: argparse.Namespace, work: Path) -> dict:
    from kernelscale.data import ingest, open_dataset
    from kernelscale.gram.engine import compute_gram
    from kernelscale.krr import nested_order
    from kernelscale.kernels import parse_arch
    from kernelscale.attack.kernel_pgd import Attack
    from kernelscale.robust.run import robust_curve

    results = {}
    for name, sizes, attacks in (
        ("mnist", args.mnist_sizes, [0.05, 0.1]),
        ("cifar", args.cifar_sizes, [1 / 255, 2 / 255]),
    ):
        train, val = ingest_pair(name, work)
        n_max = max(int(s) for s in sizes.split(","))
        sub = work / f"{name}_sub{n_max}.zarr"
        if not sub.exists():  # a class-balanced subset of the TRAIN split (disjoint from the test rows)
            ds = open_dataset(train)
            idx = np.sort(nested_order(ds.labels, 0)[:n_max])
            pixels = np.rint(np.clip(ds.affine.invert(ds.take(idx)), 0, 1) * 255).astype(np.uint8)
            npz = work / f"{name}_sub{n_max}.npz"
            np.savez(npz, images=pixels, labels=ds.labels[idx])
            ingest(str(npz), str(sub), stats_from=train, progress=False)
        gram = work / f"{name}_sub{n_max}_gram.zarr"
        t0 = time.perf_counter()
        if not gram.exists():
            compute_gram(str(sub), parse_arch(args.arch), str(gram), workers=1, progress=False)
        gram_seconds = round(time.perf_counter() - t0, 1)
        atks = [Attack("linf", e, steps=args.pgd_steps) for e in attacks]
        t0 = time.perf_counter()
        r = robust_curve(str(gram), str(sub), val, sizes, atks, reg=args.curve_reg, limit=args.test_limit, batch=100)
        r |= {"gram_seconds": gram_seconds, "attack_seconds": round(time.perf_counter() - t0, 1), "arch": args.arch,
              "eps": attacks}
        results[name] = r
        print(name, json.dumps(r), flush=True)
    plot_curve(results)
    return results


def plot_curve(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        ax.plot(r["sizes"], r["accuracy"], "o-", color="k", label="clean")
        for i, (desc, v) in enumerate(r["attacks"].items()):
            ax.plot(r["sizes"], v["robust_accuracy"], "o-", color=f"C{i}", label=f"PGD {desc.split(' x')[0]}")
        ax.set_xscale("log")
        ax.set_xlabel("training rows (nested subsets)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: full-data KRR, {r['arch']} NTK", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT_DIR / "curve.png", dpi=90)
    plt.close(fig)


def print_report() -> None:
    for name in ("mnist", "cifar"):
        path = OUT_DIR / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())["result"]
        sup = r["supports"]
        grid = [row["eps"] for row in sup["random"]["eps"]]
        head = " | ".join(f"eps {eps_text(e)}" for e in grid)
        print(f"\n{name} (n_test = {r['settings']['test_limit']}): PGD robust accuracy (random-noise accuracy)\n")
        print(f"| support | {head} |\n|---|" + "---|" * len(grid))
        for kind in ("random", "kip", "adv_kip"):
            cells = " | ".join(f"{row['robust_accuracy']:.3f} ({row['noise_accuracy']:.3f})" for row in sup[kind]["eps"])
            print(f"| {kind} | {cells} |")
        mc = r["masking_checks"]
        keys = [k for k in mc["kip"]]
        print(f"\nmasking checks at linf {eps_text(mc['eps'])}:\n\n| support | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for kind in ("kip", "adv_kip"):
            print(f"| {kind} | " + " | ".join(f"{mc[kind][k]:.3f}" for k in keys) + " |")
    path = OUT_DIR / "curve.json"
    if path.exists():
        for name, c in json.loads(path.read_text())["result"].items():
            print(f"\n{name} curve (n_test = {c['n_test']}):\n\n| N | clean | " + " | ".join(c["attacks"]) + " |\n|---|---|" + "---|" * len(c["attacks"]))
            for i, n in enumerate(c["sizes"]):
                print(f"| {n} | {c['accuracy'][i]:.3f} | " + " | ".join(f"{v['robust_accuracy'][i]:.3f}" for v in c["attacks"].values()) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["mnist", "cifar", "curve", "report"], required=True,
                   help="report: print the markdown tables of docs/results.md from the stored JSON")
    p.add_argument("--work", default="/tmp/robust_exp")
    p.add_argument("--arch", default="fc:depth=3")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--kip-steps", type=int, default=300)
    p.add_argument("--target-batch", type=int, default=500)
    p.add_argument("--train-pgd-steps", type=int, default=5)
    p.add_argument("--pgd-steps", type=int, default=20)
    p.add_argument("--strong-steps", type=int, default=100)
    p.add_argument("--restarts", type=int, default=5)
    p.add_argument("--test-limit", type=int, default=500)
    p.add_argument("--mnist-sizes", default="100,250,500,1000,2000,4000")
    p.add_argument("--cifar-sizes", default="100,250,500,1000,2000,4000")
    p.add_argument("--curve-reg", type=float, default=1e-4)
    args = p.parse_args()
    if args.part == "report":
        return print_report()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run_curve(args, work) if args.part == "curve" else run_supports(args.part, args, work)
    result = {"part": args.part, "seconds": round(time.perf_counter() - t0, 1), "command": " ".join(os.sys.argv),
              "result": result}
    (OUT_DIR / f"{args.part}.json").write_text(json.dumps(result, indent=1))
    print("total seconds", result["seconds"])


if __name__ == "__main__":
    main()
