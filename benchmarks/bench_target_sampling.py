"""KIP target batches read from a dataset store: bytes read per target row and seconds per batch, for
``--target-sampling rows`` (random rows, each read through its whole chunk) and ``chunks`` (whole chunks).

    nice -n 15 .venv/bin/python benchmarks/bench_target_sampling.py TRAIN.zarr --batch 2000 --steps 20 --json

The rows are read from the store in both modes (``memory_limit`` 0), as for a dataset larger than memory.
Also reports how evenly the classes are covered per batch (distinct classes, smallest and largest count).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def measure(path: str, batch: int, steps: int, mode: str, seed: int = 0) -> dict:
    """Bytes read per target row, seconds per batch (median) and class coverage of ``steps`` batches."""
    from kernelscale.data import open_dataset
    from kernelscale.kip.targets import TargetSampler

    ds = open_dataset(path)
    sampler = TargetSampler(ds, batch, seed, memory_limit=0, mode=mode)
    seconds, distinct, smallest, largest = [], [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        sampler.batch(step)
        seconds.append(time.perf_counter() - t0)
        counts = np.bincount(ds.labels[sampler.indices(step)], minlength=ds.num_classes)
        distinct.append(int((counts > 0).sum()))
        smallest.append(int(counts.min()))
        largest.append(int(counts.max()))
    row_bytes = int(np.prod(ds.input_shape)) * ds.x.dtype.itemsize
    return {"mode": mode, "n": ds.n, "store_dtype": ds.store_dtype, "rows_per_chunk": int(ds.x.chunks[0]),
            "batch": batch, "steps": steps, "row_bytes": row_bytes,
            "bytes_read_per_row": sampler.bytes_read / sampler.rows_read,
            "read_over_used": sampler.bytes_read / sampler.rows_read / row_bytes,
            "seconds_per_batch_median": float(np.median(seconds)),
            "classes_per_batch_min": min(distinct), "num_classes": ds.num_classes,
            "class_count_min": min(smallest), "class_count_max": max(largest)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", metavar="TRAIN.zarr")
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    for mode in ("rows", "chunks"):
        res = measure(args.data, args.batch, args.steps, mode)
        print(json.dumps(res) if args.json else
              f"{mode:6s}: {res['bytes_read_per_row']:,.0f} bytes read per target row ({res['read_over_used']:.2f}x "
              f"the {res['row_bytes']} used), {res['seconds_per_batch_median'] * 1e3:.1f} ms per batch, "
              f">= {res['classes_per_batch_min']} of {res['num_classes']} classes per batch, "
              f"per-class counts {res['class_count_min']}..{res['class_count_max']}")


if __name__ == "__main__":
    main()
