"""Gram planning at ImageNet scale (N = 1.28M, tile 4096: 49,141 tiles) with a cheap kernel on synthetic rows.

    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/bench_gram_scale.py

Creates the store, plans every tile, computes a sample (--max-tiles), reads status, resumes, and reports
the seconds of each step, the driver's peak RSS and the per-tile overhead. The matrix is never filled.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time

import numpy as np


def linear_kernel(x1, x2, get):
    """A cheap kernel (x1 . x2^T) standing in for the NTK: measures the engine's own overhead."""
    return x1.reshape(x1.shape[0], -1) @ x2.reshape(x2.shape[0], -1).T


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--tile", type=int, default=4096)
    p.add_argument("--max-tiles", type=int, default=4)
    p.add_argument("--workdir", default="/tmp/kernelscale-scale")
    args = p.parse_args()

    from kernelscale import compute_gram
    from kernelscale.data import ingest
    from kernelscale.gram.engine import gram_status
    from kernelscale.runtime import ensure_ray

    os.makedirs(args.workdir, exist_ok=True)
    data, out = f"{args.workdir}/rows.zarr", f"{args.workdir}/gram.zarr"
    res: dict = {"n": args.n, "tile": args.tile}
    if not os.path.exists(data):
        npz = f"{args.workdir}/rows.npz"
        rng = np.random.default_rng(0)
        np.savez(npz, images=rng.normal(size=(args.n, 4)).astype(np.float32), labels=np.arange(args.n) % 1000)
        t = time.perf_counter()
        ingest(npz, data, progress=False)
        res["ingest_s"] = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    ensure_ray()
    res["rss_before_mib"] = rss_mib()
    kw = dict(tile=args.tile, kernel_id="linear", progress=False)
    first = compute_gram(data, linear_kernel, out, max_tiles=args.max_tiles, **kw)
    res["first"] = {k: first[k] for k in ("tiles_total", "tiles_computed", "seconds", "compute_seconds", "plan_seconds",
                                          "tile_seconds", "workers")}
    t = time.perf_counter()
    st = gram_status(out)
    res["status_s"] = time.perf_counter() - t
    res["status"] = {k: st[k] for k in ("tiles_done", "tiles_total", "eta_seconds", "storage_bytes")}
    second = compute_gram(data, linear_kernel, out, max_tiles=args.max_tiles, **kw)
    res["resume"] = {k: second[k] for k in ("tiles_skipped", "tiles_computed", "seconds", "compute_seconds",
                                            "plan_seconds")}
    res["driver_peak_rss_mib"] = rss_mib()
    res["per_tile_overhead_s"] = second["compute_seconds"] / max(1, second["tiles_computed"])
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
