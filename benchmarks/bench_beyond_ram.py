"""Kernel regression beyond RAM: CIFAR-10 train + horizontal flips, Gram computed and solved out of core.

Run under the benchmark lock, on an otherwise idle machine (~30 minutes on 2 cores, ~25 GB of disk)::

    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/bench_beyond_ram.py --json out.json

Steps, all through the CLI (each a fresh process, wall time and the process's peak RSS recorded):
1. ingest the 50,000 CIFAR-10 train images twice with the same stratified 10% validation split (seed 0): once
   plain (45,000 train rows) and once with ``--augment hflip`` (90,000 rows: originals then mirror images);
2. the fc depth-3 NTK Gram of each train store, and the cross Gram validation x train;
3. ``solve`` with Nyström-PCG over the Zarr store streamed tile by tile (``--operator zarr``), then ``eval``.
The 90,000-row Gram is 32.4 GB as a dense float32 matrix (16.2 GB stored: upper triangle), on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psutil
from measure import run_measured

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"
CLI = [str(Path(sys.executable).parent / "kernelscale")]


def run(args: list[str]) -> dict:
    """Run one CLI command with --json; returns its JSON plus wall seconds and peak RSS (MiB)."""
    done, wall, peak = run_measured(CLI + args + ["--json", "--no-progress"])
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed with exit code {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 1)
    result["peak_rss_mib"] = round(peak["driver"])
    print(f"{args[0]} {args[1]}: {result['wall_s']} s, peak RSS {result['peak_rss_mib']} MiB", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/kernelscale-beyond-ram")
    p.add_argument("--arch", default="fc:depth=3")
    p.add_argument("--reg", default="1e-4")
    p.add_argument("--precond", default="nystrom:3000")
    p.add_argument("--tol", default="1e-6")
    p.add_argument("--workers", default="2")
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args()
    w = Path(args.workdir)
    w.mkdir(parents=True, exist_ok=True)
    res: dict = {"arch": args.arch, "reg": args.reg, "precond": args.precond, "tol": args.tol,
                 "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "cpus": psutil.cpu_count()}
    common = ["--preprocess", "standardize", "--val-fraction", "0.1", "--seed", "0"]
    for name, extra in (("plain", []), ("hflip", ["--augment", "hflip"])):
        train, val = w / f"train_{name}.zarr", w / f"val_{name}.zarr"
        if not train.exists():
            res[f"ingest_{name}"] = run(["ingest", str(CIFAR), str(train), "--val-out", str(val)] + common + extra)
    # the two validation splits must hold the same rows: the comparison is then on identical held-out data
    import numpy as np

    from kernelscale.data import open_dataset

    vp, vh = open_dataset(str(w / "val_plain.zarr")), open_dataset(str(w / "val_hflip.zarr"))
    res["val_identical"] = bool(vp.n == vh.n and np.array_equal(vp.labels, vh.labels)
                                and np.array_equal(vp.rows(0, vp.n), vh.rows(0, vh.n)))
    if not res["val_identical"]:
        raise SystemExit("the plain and hflip ingests produced different validation rows")
    for name in ("plain", "hflip"):
        train, val, gram, cross, model = (str(w / f"{x}_{name}.zarr") for x in ("train", "val", "gram", "cross", "model"))
        kern = ["--arch", args.arch, "--kernel", "ntk", "--workers", args.workers]
        res[f"gram_{name}"] = run(["gram", train, "--out", gram] + kern)
        res[f"cross_{name}"] = run(["gram", val, "--against", train, "--out", cross] + kern)
        res[f"solve_{name}"] = run(["solve", gram, "--data", train, "--reg", args.reg, "--reg-scale", "trace",
                                    "--tol", args.tol, "--max-iter", "500", "--precond", args.precond,
                                    "--operator", "zarr", "--out", model])
        res[f"eval_{name}"] = run(["eval", model, "--cross", cross, "--test", val])
        if args.json:  # partial results survive a later failure
            Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in res if k.startswith("eval") or k.startswith("solve")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
