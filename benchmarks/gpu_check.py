"""GPU check: Gram (fc, convnet, Myrtle), a kernel ridge solve and a few KIP steps on whatever accelerators exist.

    .venv/bin/python benchmarks/gpu_check.py            # on a GPU machine (sizes for one GPU, a few minutes)
    .venv/bin/python benchmarks/gpu_check.py --small    # any machine, seconds (used by the tests on CPU)

Prints one JSON object: the JAX backend and devices (``"fallback": "cpu"`` when there is no GPU), and per part
the throughput: Gram entries/s (symmetric stored entries per wall second, Ray actors one per GPU), CG seconds
per iteration, KIP seconds per step (fc, and ConvNet with the native kernel). Synthetic standardized 32x32x3 rows (8x8x3 with --small); nothing is
downloaded. Actors run one per GPU (``--gpus-per-worker 1``; 0.5 packs two per GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np

FULL = {"side": 32, "myrtle_side": 32, "fc": 8192, "convnet": 512, "myrtle": 128, "solve": 8192, "kip_target": 2000, "kip_steps": 20,
        "conv_kip_target": 500, "conv_kip_steps": 5}
# 8x8 images (Myrtle pools 5 times: it needs 32x32): a conv kernel's cost per pair grows as (H W)^2, so this is ~256x cheaper per entry than 32x32
SMALL = {"side": 8, "myrtle_side": 32, "fc": 128, "convnet": 16, "myrtle": 3, "solve": 128, "kip_target": 64, "kip_steps": 3,
         "conv_kip_target": 16, "conv_kip_steps": 2}


def devices() -> dict:
    import jax

    devs = jax.devices()
    backend = jax.default_backend()
    out = {"backend": backend, "devices": [str(d) for d in devs], "count": len(devs)}
    if backend != "gpu":
        out["fallback"] = "cpu"
        out["note"] = "no GPU visible to JAX: numbers are CPU numbers"
    return out


def synthetic(path: str, n: int, side: int = 32, seed: int = 0) -> str:
    """A dataset store of n standardized side x side x 3 rows with 10 balanced classes."""
    from kernelscale.data import ingest

    rng = np.random.default_rng(seed)
    npz = path + ".npz"
    np.savez(npz, images=rng.uniform(size=(n, side, side, 3)).astype(np.float32), labels=np.arange(n) % 10)
    ingest(npz, path, preprocess="standardize", progress=False)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny sizes: checks the script runs (CPU, seconds)")
    p.add_argument("--workdir", help="where the stores go (default: a temp dir, removed)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per Gram actor (default 1 with GPUs, else 0)")
    p.add_argument("--archs", default="fc,convnet,myrtle", help="Grams to time (comma-separated; the solve and KIP use fc)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from kernelscale import compute_gram, parse_arch
    from kernelscale.kip.run import distill
    from kernelscale.krr import solve

    sizes = SMALL if args.small else FULL
    dev = devices()
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if dev["backend"] == "gpu" else 0.0)
    work = args.workdir or tempfile.mkdtemp(prefix="kernelscale-gpu-check-")
    result: dict = {"small": args.small, "devices": dev, "gpus_per_worker": gpus, "gram": {}}
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if "fc" not in archs:
        archs.insert(0, "fc")  # the solve and KIP parts use the fc Gram and data
    for arch in archs:
        n = sizes[arch]
        side = sizes["myrtle_side"] if arch == "myrtle" else sizes["side"]
        data = synthetic(os.path.join(work, f"{arch}.zarr"), n, side)
        spec = parse_arch({"fc": "fc:depth=3", "convnet": "convnet", "myrtle": "myrtle:depth=5"}[arch], "ntk")
        r = compute_gram(data, spec, os.path.join(work, f"{arch}_gram.zarr"), gpus_per_worker=gpus, progress=False,
                         workers=None if gpus else 1)
        entries = n * (n + 1) // 2
        result["gram"][arch] = {"n": n, "image": [side, side, 3], "seconds": r["seconds"], "compute_seconds": r["compute_seconds"],
                                "stored_entries_per_s": round(entries / r["compute_seconds"], 1),
                                "seconds_per_entry": r["compute_seconds"] / entries, "workers": r["workers"],
                                "tile_seconds": r["tile_seconds"]}
    n = sizes["solve"]
    data = os.path.join(work, "fc.zarr") if n == sizes["fc"] else synthetic(os.path.join(work, "solve.zarr"), n, sizes["side"])
    gram = os.path.join(work, "fc_gram.zarr")
    t = time.perf_counter()
    s = solve(gram, data, reg=1e-2, out=os.path.join(work, "model.zarr"), tol=1e-6, max_iter=500, progress=False)
    result["solve"] = {"n": n, "status": s["status"], "iterations": s["iterations"], "seconds": round(time.perf_counter() - t, 3),
                       "seconds_per_iteration": s.get("seconds_per_iteration")}
    k = distill(os.path.join(work, "fc.zarr"), out=os.path.join(work, "kip.zarr"), arch="fc:depth=3", ipc=10 if not args.small else 2,
                steps=sizes["kip_steps"], target_batch=min(sizes["kip_target"], sizes["fc"]), progress=False,
                checkpoint_every=sizes["kip_steps"])
    result["kip"] = {"steps": sizes["kip_steps"], "seconds_per_step": k["seconds_per_step"],
                     "first_step_seconds": k["first_step_seconds"], "final_loss": k["final_loss"]}
    if "convnet" in archs:  # ConvNet KIP (native kernel, gradients through JAX): 10 images per class
        k = distill(os.path.join(work, "convnet.zarr"), out=os.path.join(work, "kip_convnet.zarr"), arch="convnet:depth=3",
                    ipc=10 if not args.small else 1, steps=sizes["conv_kip_steps"],
                    target_batch=min(sizes["conv_kip_target"], sizes["convnet"]), progress=False,
                    checkpoint_every=sizes["conv_kip_steps"])
        result["kip_convnet"] = {"steps": sizes["conv_kip_steps"], "target_batch": sizes["conv_kip_target"],
                                 "seconds_per_step": k["seconds_per_step"], "first_step_seconds": k["first_step_seconds"]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
