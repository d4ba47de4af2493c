"""The same ImageFolder ingested as float32, float16 and uint8 stores: read speed of KIP target batches and
accuracy of the same rows.

    .venv/bin/python benchmarks/store_dtype_compare.py --store uint8=U8.zarr,U8_VAL.zarr \\
        --store float16=F16.zarr,F16_VAL.zarr --store float32=F32.zarr,F32_VAL.zarr \\
        --batches 50 --train 10000 --test 5000 --json docs/results_kip_imagenet_scale.json

Read speed: ``--batches`` chunk-wise target batches of ``--batch`` rows (KIP's ``chunks`` sampling, read from the
store, not from memory), seconds per batch and bytes read per row. Accuracy: fc depth-3 NTK kernel regression
(ridge 1e-6 x trace/n, centred one-hot targets) from the first ``--train`` train rows to the first ``--test``
held-out rows, the same rows in every store (checked: same labels); also the largest difference of the model
inputs from the first store's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kip_imagenet_scale import dir_bytes, update_json


def read_speed(path: str, batch: int, batches: int, seed: int = 1) -> dict:
    from kernelscale.data import open_dataset
    from kernelscale.kip.targets import TargetSampler

    ds = open_dataset(path)
    sampler = TargetSampler(ds, batch, seed, memory_limit=0, mode="chunks")
    seconds = []
    t_all = time.perf_counter()
    for step in range(batches):
        t0 = time.perf_counter()
        sampler.batch(step)
        seconds.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    return {"batches": batches, "batch": batch, "rows_per_chunk": int(ds.x.chunks[0]),
            "seconds_total": round(total, 2), "seconds_per_batch_median": round(float(np.median(seconds)), 4),
            "microseconds_per_row": round(total / (batches * batch) * 1e6, 2),
            "bytes_read_per_row": round(sampler.bytes_read / sampler.rows_read, 1)}


def krr_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 num_classes: int, reg: float = 1e-6) -> dict:
    import jax
    import scipy.linalg

    from kernelscale.kernels import kernel_fn, parse_arch
    from kernelscale.data.labels import one_hot

    spec = parse_arch("fc:depth=3", "ntk")
    fn = kernel_fn(spec)
    k = jax.jit(lambda a, b: fn(a, b, "ntk"))
    t0 = time.perf_counter()
    k_tt = np.asarray(k(x_train, x_train), np.float64)
    k_vt = np.asarray(k(x_test, x_train), np.float64)
    t1 = time.perf_counter()
    lam = reg * np.trace(k_tt) / len(k_tt)
    alpha = scipy.linalg.solve(k_tt + lam * np.eye(len(k_tt)), one_hot(y_train, num_classes).astype(np.float64),
                               assume_a="pos")
    pred = k_vt @ alpha
    return {"accuracy": float((pred.argmax(1) == y_test).mean()), "kernel_seconds": round(t1 - t0, 2),
            "solve_seconds": round(time.perf_counter() - t1, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", action="append", required=True, help="DTYPE=TRAIN.zarr,VAL.zarr (first: reference)")
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--test", type=int, default=5000)
    p.add_argument("--skip-read", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    from kernelscale.data import open_dataset

    results, ref = {}, None
    for item in args.store:
        name, paths = item.split("=", 1)
        train, val = paths.split(",")
        tr, va = open_dataset(train), open_dataset(val)
        row = {"train": train, "val": val, "store_dtype": tr.store_dtype, "n_train": tr.n, "n_val": va.n,
               "x_bytes_on_disk": dir_bytes(__import__("pathlib").Path(train) / "x"),
               "store_bytes_on_disk": dir_bytes(__import__("pathlib").Path(train)),
               "val_store_bytes_on_disk": dir_bytes(__import__("pathlib").Path(val))}
        if not args.skip_read:
            row["read"] = read_speed(train, args.batch, args.batches)
        x_tr, x_te = tr.take(np.arange(args.train)), va.take(np.arange(args.test))
        y_tr, y_te = tr.labels[: args.train], va.labels[: args.test]
        if ref is None:
            ref = (x_tr, x_te, y_tr, y_te)
        else:
            row["same_labels_as_reference"] = bool(np.array_equal(y_tr, ref[2]) and np.array_equal(y_te, ref[3]))
            diff = max(float(np.abs(x_tr - ref[0]).max()), float(np.abs(x_te - ref[1]).max()))
            row["max_abs_input_difference_from_reference"] = diff
            row["inputs_bitwise_equal_to_reference"] = bool(np.array_equal(x_tr, ref[0]) and np.array_equal(x_te, ref[1]))
        row["krr_fc3_ntk"] = krr_accuracy(x_tr, y_tr, x_te, y_te, tr.num_classes)
        results[name] = row
        print(name, json.dumps(row), flush=True)
        if args.json:
            update_json(args.json, store_dtypes={"reference": args.store[0].split("=")[0], "train_rows": args.train,
                                                 "test_rows": args.test, "stores": results})


if __name__ == "__main__":
    main()
