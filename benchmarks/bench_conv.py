"""Convolutional kernels: kernelscale's native kernels vs neural-tangents, side by side, same images.

Run on an otherwise idle machine (the figures in docs/benchmarks.md come from it)::

    .venv/bin/python benchmarks/bench_conv.py --json docs/results_conv.json

For each kernel (convnet-3 NTK, Myrtle-5 NTK at 32x32, fc-3 NTK) it times the full symmetric Gram of N CIFAR-10
images (32x32, per-channel standardised; synthetic images if the CIFAR-10 folder is absent):

* ``neural-tangents``: a jitted ``kernel_fn`` of the ``stax`` network with ``stax.Relu`` under ``nt.batch``,
  every block of the N x N Gram (what a user writes);
* ``neural-tangents + fast_relu``: the same with kernelscale's polynomial-arctan ReLU layer;
* ``kernelscale``: ``kernels.gram_calls(spec)``, the calls the Gram engine makes (compiled CPU code for
  convolutional kernels, each unordered pair once, exact diagonal), in this process, on all cores.

Each Gram is timed after a warm-up call (compilation excluded), and the kernelscale Gram is checked against
neural-tangents'. Also reported: pairs per second, and the fraction of this machine's measured float32 GEMM
and elementwise throughput that the native kernel reaches (from a count of its arithmetic per pair).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"


def load_images(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """n CIFAR-10 training images (a seeded draw over all classes), per-channel standardised, float32."""
    rng = np.random.default_rng(seed)
    if not CIFAR.is_dir():
        return rng.normal(size=(n, 32, 32, 3)).astype(np.float32), "synthetic N(0, 1) images"
    from PIL import Image

    files = sorted(p for d in sorted(CIFAR.iterdir()) if d.is_dir() for p in d.iterdir())
    pick = rng.choice(len(files), size=n, replace=False)
    x = np.stack([np.asarray(Image.open(files[i]).convert("RGB"), np.float32) / 255.0 for i in pick])
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))
    return x.astype(np.float32), f"{n} CIFAR-10 training images (seed {seed})"


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 GEMM throughput of this machine (numpy/OpenBLAS, all cores), GFLOP/s."""
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n**3 / ((time.perf_counter() - t) / repeats) / 1e9


def elementwise_gflops(threads: int) -> float:
    """float32 FMA throughput on an L1-resident array (numba, vectorised, ``threads`` threads), GFLOP/s."""
    import numba
    from numba import njit, prange

    @njit(fastmath=True, parallel=True)
    def fma_loop(a: np.ndarray, reps: int) -> float:
        total = np.float32(0.0)
        for t in prange(a.shape[0]):
            row = a[t].copy()
            for _ in range(reps):
                for i in range(row.shape[0]):
                    row[i] = row[i] * np.float32(0.999) + np.float32(0.001)
            total += row[0]
        return total

    numba.set_num_threads(threads)
    a = np.ones((threads, 4096), np.float32)
    fma_loop(a, 10)
    reps = 20000
    t = time.perf_counter()
    fma_loop(a, reps)
    return 2 * threads * 4096 * reps / (time.perf_counter() - t) / 1e9


def flops_per_pair(spec, shape: tuple[int, ...]) -> float:
    """Arithmetic of the native kernel per pair (float32 operations; a square root counts as one): per
    covariance entry of a stage, 2C (channel products, first conv), 4 per box sum (separable 3 + 3 adds,
    NNGP and NTK), 4 per affine map, 32 per ReLU (arc-cosine polynomial, 2 square roots, NTK product),
    4 per pool contribution."""
    from kernelscale.kernels.native._cpu import stage_plan

    net_ops = {"convnet": ("conv", "act", "pool") * spec.params["depth"]}.get(spec.arch)
    if net_ops is None:
        from kernelscale.kernels.native._conv import ConvNet

        net_ops = ConvNet.myrtle(spec.params["depth"], 1.0, 0.0, shape[0], shape[1]).ops
    stage_ops, dims, _, _ = stage_plan(net_ops, shape[0], shape[1])
    total = 0.0
    for k, (h, w, dy, dx) in enumerate(dims):
        ny = sum(max(0, min(h, h - d) - max(0, -d)) for d in range(-dy, dy + 1))
        nx = sum(max(0, min(w, w - d) - max(0, -d)) for d in range(-dx, dx + 1))
        entries = ny * nx
        ops = [o for o in stage_ops[k] if o >= 0]
        per = 4.0 if k < len(dims) - 1 else 2.0  # pool (or the readout's sum)
        for j, o in enumerate(ops):
            per += (2 * shape[2] + 8 + 4) if (k == 0 and j == 0) else (8 + 4) if o == 0 else 32
        total += entries * per
    return total


def time_gram(fn, x: np.ndarray, warm: np.ndarray) -> tuple[float, np.ndarray]:
    """Seconds of ``fn(x)`` after a warm-up call ``fn(warm)`` (compilation excluded)."""
    np.asarray(fn(warm))
    t = time.perf_counter()
    k = np.asarray(fn(x))
    return time.perf_counter() - t, k


def _x64():
    from jax.experimental import enable_x64

    return enable_x64()


def nt_gram_fn(spec, fast: bool, batch: int):
    from kernelscale import kernels

    fn = kernels.nt_batch(kernels.kernel_fn(spec, fast=fast, native=False), batch_size=batch)
    return lambda x: fn(x, x, spec.kernel)


def run(arch: str, n: int, nt_n: int, nt_batch: int, x: np.ndarray) -> dict:
    from kernelscale import kernels

    spec = kernels.parse_arch(arch, "ntk")
    _, sym = kernels.gram_calls(spec)
    nt_n, n = min(nt_n, len(x)), min(n, len(x))
    warm = x[: max(2, nt_batch)] if spec.arch != "fc" else x[:nt_n]  # fc: jitted per shape, warm the same shape
    row = {"arch": spec.describe(), "n": n, "nt_n": nt_n}
    # exactness of both against float64 neural-tangents (stax.Relu) on the first 6 images
    with _x64():
        ref = np.asarray(kernels.kernel_fn(spec, fast=False, native=False)(x[:6].astype(np.float64), None, "ntk"))
    nt32 = np.asarray(kernels.kernel_fn(spec, fast=False, native=False)(x[:6], None, "ntk"), np.float64)
    scale = np.abs(ref).max()
    row["max_err_vs_float64_nt"] = float(np.abs(np.asarray(sym(x[:6]), np.float64) - ref).max() / scale)
    row["nt_float32_max_err_vs_float64_nt"] = float(np.abs(nt32 - ref).max() / scale)
    t_ks_small, k_ks_small = time_gram(sym, x[:nt_n], warm)
    t_ks, _ = time_gram(sym, x[:n], warm if spec.arch != "fc" else x[:n]) if n != nt_n else (t_ks_small, None)
    for name, fast in (("nt", False), ("nt_fast_relu", True)):
        t_nt, k_nt = time_gram(nt_gram_fn(spec, fast, nt_batch), x[:nt_n], warm[:nt_batch])
        row[f"{name}_seconds"] = round(t_nt, 3)
        row[f"{name}_pairs_per_s"] = round(nt_n * nt_n / t_nt, 1)  # nt.batch computes every ordered pair
        row[f"speedup_vs_{name}"] = round(t_nt / t_ks_small, 2)
        if name == "nt":
            off = ~np.eye(nt_n, dtype=bool)
            row["max_rel_diff_vs_nt_off_diagonal"] = float(np.abs(k_ks_small - k_nt)[off].max() / np.abs(k_nt).max())
    # like-for-like factors on the same N = nt_n Gram: the native JAX recursion (structure alone) and the
    # compiled CPU path over every ordered pair (fusion), before symmetry halves the pairs
    from kernelscale.kernels import native

    for name, fn in (("native_jax_full", native.block_kernel(spec)), ("native_cpu_full", kernels.gram_calls(spec)[0])):
        t_full, _ = time_gram(lambda a, f=fn: f(a, a), x[:nt_n], x[:nt_n])  # jitted per shape: warm the same
        row[f"{name}_seconds"] = round(t_full, 3)
    pairs = n * (n + 1) / 2
    row.update({"kernelscale_seconds_nt_n": round(t_ks_small, 3), "kernelscale_seconds": round(t_ks, 3),
                "kernelscale_pairs_per_s": round(pairs / t_ks, 1),
                "kernelscale_us_per_entry": round(1e6 * t_ks / pairs, 1)})
    if spec.arch != "fc":
        row["flops_per_pair"] = flops_per_pair(spec, x.shape[1:])
        row["kernelscale_gflops"] = round(row["flops_per_pair"] * pairs / t_ks / 1e9, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-conv", type=int, default=512, help="images in the kernelscale convnet Gram")
    ap.add_argument("--n-myrtle", type=int, default=128, help="images in the kernelscale Myrtle Gram")
    ap.add_argument("--n-fc", type=int, default=4000, help="images in the kernelscale fc Gram")
    ap.add_argument("--nt-n", type=int, default=24, help="images in the neural-tangents Grams (and the ratio)")
    ap.add_argument("--nt-batch", type=int, default=8, help="nt.batch batch size for the convolutional kernels")
    ap.add_argument("--skip", default="", help="comma-separated kernels to skip: convnet,myrtle,fc")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from kernelscale.kernels.native._api import cpu_threads

    x, source = load_images(max(args.n_conv, args.n_myrtle, args.n_fc, args.nt_n))
    threads = cpu_threads()
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "data": source,
           "gemm_gflops": round(gemm_gflops(), 1), "elementwise_gflops": round(max(elementwise_gflops(t) for t in sorted({1, threads})), 1),
           "rows": []}
    print(f"machine: {out['machine']}; GEMM {out['gemm_gflops']} GFLOP/s, elementwise FMA "
          f"{out['elementwise_gflops']} GFLOP/s; data: {source}", flush=True)
    plan = [("convnet:depth=3", args.n_conv, args.nt_n, args.nt_batch),
            ("myrtle:depth=5", args.n_myrtle, min(args.nt_n, 16), min(args.nt_batch, 4)),
            ("fc:depth=3", args.n_fc, max(args.nt_n, 1000), 500)]
    for arch, n, nt_n, nt_batch in plan:
        if arch.split(":")[0] in args.skip.split(","):
            continue
        row = run(arch, n, nt_n, nt_batch, x)
        if "kernelscale_gflops" in row:
            row["fraction_of_elementwise"] = round(row["kernelscale_gflops"] / out["elementwise_gflops"], 3)
            row["fraction_of_gemm"] = round(row["kernelscale_gflops"] / out["gemm_gflops"], 3)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    print("\n| kernel | Gram of N | kernelscale | pairs/s | vs neural-tangents (stax.Relu), same Gram | vs nt + fast_relu "
          "| error vs float64 nt: kernelscale / nt float32 |")
    print("|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['arch']} | {r['n']} | {r['kernelscale_seconds']} s | {r['kernelscale_pairs_per_s']} | "
              f"**{r['speedup_vs_nt']}x** (N = {r['nt_n']}: {r['nt_pairs_per_s']} pairs/s) | "
              f"{r['speedup_vs_nt_fast_relu']}x | {r['max_err_vs_float64_nt']:.1e} / "
              f"{r['nt_float32_max_err_vs_float64_nt']:.1e} |")
    print("\nLike-for-like factors on the neural-tangents Gram (each row's time over the next):")
    for r in out["rows"]:
        steps = [("nt", r["nt_seconds"]), ("nt + fast_relu", r["nt_fast_relu_seconds"]),
                 ("native JAX, all pairs", r["native_jax_full_seconds"]),
                 ("native compiled, all pairs", r["native_cpu_full_seconds"]),
                 ("native compiled, each pair once", r["kernelscale_seconds_nt_n"])]
        r["factors"] = {f"{a} -> {b}": round(ta / tb, 2) for (a, ta), (b, tb) in zip(steps, steps[1:])}
        print(f"  {r['arch']}: " + ", ".join(f"{k}: {v}x" for k, v in r["factors"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
