"""Gram engine benchmark: kernelscale vs ``neural_tangents.batch`` side by side, same kernel, same data.

Run on an otherwise idle machine (nothing else timed at once; the figures in docs/benchmarks.md come from it)::

    .venv/bin/python benchmarks/bench_gram.py --n 10000 --json out.json

Measures: a float32 matmul roofline (GFLOP/s), the fc depth-3 NTK of N CIFAR-10 images with nt.batch and
with kernelscale (1 and 2 workers), a convnet NTK at a size this machine holds, per-tile cost, and an
extrapolation to CIFAR-10 (50k), CIFAR-5m and ImageNet (1.28M). Prints a markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"


def matmul_gflops(n: int = 2048, d: int = 3072, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, d)).astype(np.float32))
    mm = jax.jit(lambda x, y: x @ y.T)
    mm(a, a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        mm(a, a).block_until_ready()
    return 2 * n * n * d / ((time.perf_counter() - t) / repeats) / 1e9


def nt_batch_gram(spec, x: np.ndarray, batch_size: int, fast: bool = False) -> tuple[float, float, np.ndarray]:
    """(cold seconds incl. compile, warm seconds, K) of nt.batch on the full N x N Gram.

    ``fast=False`` is the baseline a user would write: neural-tangents' own stax.Relu network under nt.batch.
    ``fast=True`` runs nt.batch over kernelscale's kernel_fn (fast_relu), to separate the kernel's share of
    the speedup from the engine's.
    """
    from kernelscale import kernels

    fn = kernels.nt_batch(kernels.kernel_fn(spec, fast=fast, native=False), batch_size=batch_size)
    t = time.perf_counter()
    k = np.asarray(fn(x, x, spec.kernel))
    cold = time.perf_counter() - t
    t = time.perf_counter()
    k = np.asarray(fn(x, x, spec.kernel))
    warm = time.perf_counter() - t
    return cold, warm, k


def nt_batch_child(data: str, n: int, batch_size: int, fast: bool, out: str) -> None:
    """Child-process body: nt.batch on the first n rows of data; timings as JSON on stdout, K saved to out."""
    from kernelscale import parse_arch
    from kernelscale.data import open_dataset

    x = open_dataset(data).rows(0, n)
    cold, warm, k = nt_batch_gram(parse_arch("fc:depth=3", "ntk"), x, batch_size, fast=fast)
    np.save(out, k)
    print(json.dumps({"cold": cold, "warm": warm, "xla_flags": os.environ.get("XLA_FLAGS", "")}))


def nt_batch_in_child(data: str, n: int, batch_size: int, fast: bool, xla_defaults: bool, out: str) -> dict:
    """Run nt.batch in a fresh process: with the user's default XLA settings (``xla_defaults=False``: what a
    user's own script gets) or with the XLA CPU flags kernelscale sets for its processes."""
    import subprocess

    env = dict(os.environ, KERNELSCALE_XLA_DEFAULTS="1" if xla_defaults else "0")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, __file__, "--nt-batch-child", data, "--n", str(n), "--batch-size", str(batch_size),
           "--child-out", out] + (["--child-fast"] if fast else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def ours(data: str, spec, out: str, **kw) -> dict:
    from kernelscale import compute_gram

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    summary = compute_gram(data, spec, out, progress=False, **kw)
    summary["wall"] = time.perf_counter() - t
    return summary


def max_rel_err(path: str, ref: np.ndarray) -> float:
    from kernelscale import open_gram

    k = open_gram(path).to_numpy()
    return float(np.abs(k - ref).max() / np.abs(ref).max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000, help="CIFAR-10 rows for the fc case")
    p.add_argument("--tile", type=int, default=None, help="default: the engine's default tile")
    p.add_argument("--sub-block", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1000, help="nt.batch batch_size (must divide N)")
    p.add_argument("--conv-n", type=int, default=128)
    p.add_argument("--conv-size", default="8x8")
    p.add_argument("--workdir", default="/tmp/kernelscale-bench")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--skip-conv", action="store_true")
    p.add_argument("--nt-batch-child", metavar="DATA", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-fast", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.nt_batch_child:
        nt_batch_child(args.nt_batch_child, args.n, args.batch_size, args.child_fast, args.child_out)
        return 0

    from kernelscale import parse_arch
    from kernelscale.data import ingest, open_dataset
    from kernelscale.runtime import ensure_ray

    os.makedirs(args.workdir, exist_ok=True)
    res: dict = {"n": args.n, "tile": args.tile, "cpus": os.cpu_count()}
    data = f"{args.workdir}/cifar{args.n}.zarr"
    if not os.path.exists(data):
        t = time.perf_counter()
        ingest(str(CIFAR), data, limit=args.n, preprocess="standardize", progress=False)
        res["ingest_s"] = time.perf_counter() - t
    x = open_dataset(data).rows(0, args.n)
    d = int(np.prod(x.shape[1:]))

    res["matmul_gflops"] = matmul_gflops()
    spec = parse_arch("fc:depth=3", "ntk")
    base = nt_batch_in_child(data, args.n, args.batch_size, False, False, f"{args.workdir}/ref.npy")
    cold, warm = base["cold"], base["warm"]
    res["nt_batch_cold_s"], res["nt_batch_warm_s"] = cold, warm
    tuned = nt_batch_in_child(data, args.n, args.batch_size, True, True, f"{args.workdir}/ref_fast.npy")
    res["nt_batch_fastrelu_xla_flags"] = tuned["xla_flags"]
    res["nt_batch_fastrelu_cold_s"], res["nt_batch_fastrelu_warm_s"] = tuned["cold"], tuned["warm"]
    ref = np.load(f"{args.workdir}/ref.npy")
    res["fastrelu_vs_relu_max_rel_err"] = float(np.abs(np.load(f"{args.workdir}/ref_fast.npy") - ref).max()
                                                / np.abs(ref).max())
    t = time.perf_counter()
    ensure_ray()
    res["ray_start_s"] = time.perf_counter() - t
    for w in (1, 2):
        for run in ("", "_repeat"):  # first call (fresh actor processes) and a second identical call
            key = f"ours_w{w}{run}"
            s = ours(data, spec, f"{args.workdir}/fc{w}.zarr", tile=args.tile, workers=w, sub_block=args.sub_block)
            res[key] = {k: s[k] for k in ("wall", "compute_seconds", "tiles_total", "tile", "sub_block",
                                          "tile_seconds", "entries_per_s")}
        res[f"ours_w{w}"]["max_rel_err"] = max_rel_err(f"{args.workdir}/fc{w}.zarr", ref)
    del ref
    best_first = min(res["ours_w1"]["wall"], res["ours_w2"]["wall"])
    best_repeat = min(res["ours_w1_repeat"]["wall"], res["ours_w2_repeat"]["wall"])
    best = min(best_first, best_repeat)
    res["speedup_vs_nt_batch_cold"] = cold / best_first
    res["speedup_vs_nt_batch_cold_repeat"] = cold / best_repeat
    res["speedup_vs_nt_batch_warm"] = warm / best_first
    res["speedup_vs_nt_batch_cold_incl_ray_start"] = cold / (best_first + res["ray_start_s"])
    res["speedup_vs_nt_batch_fastrelu_xla_flags_cold"] = tuned["cold"] / best_first
    upper_flops = 2 * (args.n * (args.n + 1) / 2) * d
    res["roofline_fraction"] = upper_flops / (res["matmul_gflops"] * 1e9) / best
    tiles = res["ours_w2"]["tiles_total"]
    res["fc_seconds_per_entry_w2"] = res["ours_w2_repeat"]["compute_seconds"] / (args.n * (args.n + 1) / 2)
    res["fc_tile_cost_s"] = res["ours_w1_repeat"]["compute_seconds"] / tiles  # actor-seconds per tile (1 actor)

    if not args.skip_conv:
        cdata = f"{args.workdir}/cifar_conv{args.conv_n}_{args.conv_size}.zarr"
        if not os.path.exists(cdata):
            ingest(str(CIFAR), cdata, limit=args.conv_n, resize=args.conv_size, preprocess="standardize", progress=False)
        xc = open_dataset(cdata).rows(0, args.conv_n)
        cspec = parse_arch("convnet:depth=3", "ntk")
        bs = 16
        c_cold, c_warm, cref = nt_batch_gram(cspec, xc, bs)  # baseline: stax.Relu
        cs = ours(cdata, cspec, f"{args.workdir}/conv.zarr", tile=32, workers=2)
        res["conv"] = {"n": args.conv_n, "size": args.conv_size, "nt_batch_cold_s": c_cold, "nt_batch_warm_s": c_warm,
                       "nt_batch_size": bs, "ours_wall": cs["wall"], "ours_compute": cs["compute_seconds"],
                       "sub_block": cs["sub_block"], "tiles": cs["tiles_total"],
                       "max_rel_err": max_rel_err(f"{args.workdir}/conv.zarr", cref),
                       "seconds_per_pair": cs["compute_seconds"] / (args.conv_n * (args.conv_n + 1) / 2)}
    print(json.dumps(res, indent=1, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
