"""KIP benchmark: accuracy with the command's defaults, step time vs a plain loop, 2-worker speedup.

Run under the benchmark lock (timings are only comparable when nothing else is timed at once):

    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/bench_kip.py --work /tmp/kip_bench \
        [--parts overhead,accuracy,workers] [--ipcs 10,1,50]

Data: CIFAR-10 from ../shared/data/cifar10/train, ingested once with --val-fraction 0.1 and
--preprocess standardize (see docs/benchmarks.md for why not ZCA); accuracies are on the held-out split.
Prints one JSON object per part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"


def ensure_data(work: Path) -> tuple[str, str]:
    from kernelscale.data import ingest

    train, val = work / "cifar_std_train.zarr", work / "cifar_std_val.zarr"
    if not train.exists() or not val.exists():
        ingest(str(CIFAR), str(train), val_fraction=0.1, val_out=str(val), preprocess="standardize",
               overwrite=True, progress=False)
    return str(train), str(val)


def plain_loop_vs_ours(train: str, steps: int, batch: int = 2000, ipc: int = 10) -> dict:
    """Median step time of a plain neural-tangents + optax KIP loop and of kernelscale's, alternating blocks."""
    import jax
    import jax.numpy as jnp
    import optax

    from kernelscale import kip as kipmod
    from kernelscale.data import open_dataset
    from kernelscale.kernels import kernel_fn, parse_arch
    from kernelscale.kip_data import TargetSampler, init_random
    from kernelscale.kip_sharding import pair_kernel

    data = open_dataset(train)
    spec = parse_arch("fc:depth=3", "ntk")
    rows = init_random(data, ipc, 0)
    x0, y0 = data.take(rows), data.one_hot(rows)
    # -- plain loop (what a user writes by hand): all of DATA in memory, numpy sampling, one jitted step
    x_all, y_all = data.rows(0, data.n), data.one_hot()
    kfn = kernel_fn(spec)
    opt = optax.adam(0.01)

    def loss_fn(params, x_t, y_t):
        k_ss = kfn(params["x"], params["x"], "ntk")
        k_ts = kfn(x_t, params["x"], "ntk")
        a = k_ss + 1e-6 * jnp.trace(k_ss) / k_ss.shape[0] * jnp.eye(k_ss.shape[0])
        pred = k_ts @ jnp.linalg.solve(a, params["y"])
        return 0.5 * jnp.mean(jnp.sum((y_t - pred) ** 2, axis=1))

    @jax.jit
    def plain_step(params, opt_state, x_t, y_t):
        loss, g = jax.value_and_grad(loss_fn)(params, x_t, y_t)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    params = {"x": jnp.asarray(x0), "y": jnp.asarray(y0)}
    opt_state = opt.init(params)
    kip = kipmod.make_kip(pair_kernel(spec), lr=0.01, reg=1e-6, learn_labels=True)
    state = kip.init(x0, y0)
    sampler = TargetSampler(data, batch, 0)
    plain_times, our_times = [], []
    block = 25
    for rep in range(steps // block):
        for _ in range(block):
            t0 = time.perf_counter()
            idx = rng.choice(data.n, batch, replace=False)
            params, opt_state, loss = plain_step(params, opt_state, x_all[idx], y_all[idx])
            float(loss)
            plain_times.append(time.perf_counter() - t0)
        batches = sampler.iterate(rep * block, (rep + 1) * block)
        for _ in range(block):
            t0 = time.perf_counter()
            state, metrics = kip.update(state, next(batches))
            float(metrics["loss"])
            our_times.append(time.perf_counter() - t0)
    plain = statistics.median(plain_times[block:])
    ours = statistics.median(our_times[block:])
    return {"part": "overhead", "steps_each": len(plain_times), "target_batch": batch,
            "plain_seconds_per_step": round(plain, 5), "ours_seconds_per_step": round(ours, 5),
            "ratio_ours_over_plain": round(ours / plain, 4)}


def accuracy(train: str, val: str, work: Path, ipc: int) -> dict:
    """``kernelscale distill`` with its DEFAULT steps/lr/target batch, labels learned, reg 1e-6; val accuracy."""
    from kernelscale.cli import main
    from kernelscale.storage import remove

    out = work / f"bench_ipc{ipc}.zarr"
    remove(str(out))
    argv = ["distill", train, "--arch", "fc:depth=3", "--kernel", "ntk", "--ipc", str(ipc), "--learn-labels",
            "--reg", "1e-6", "--val", val, "--out", str(out), "--json", "--no-progress"]
    t0 = time.perf_counter()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    wall = time.perf_counter() - t0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    return {"part": "accuracy", "ipc": ipc, "exit_code": code, "command": "kernelscale " + " ".join(argv),
            "wall_seconds": round(wall, 1), "val_accuracy": summary.get("val_accuracy"),
            "val_accuracy_init": summary.get("val_accuracy_init"), "history": summary.get("history"),
            "seconds_per_step": summary.get("seconds_per_step"), "steps": summary.get("steps")}


def workers(train: str, steps: int, batch: int = 8000) -> dict:
    """Step time with 1 worker (in-process) and 2 Ray actors at target batch 8,000; communication per step."""
    from kernelscale.kip_run import distill
    from kernelscale.runtime import ensure_ray
    from kernelscale.storage import remove

    info = ensure_ray(num_cpus=2)
    out = {}
    for w in (1, 2):
        path = f"/tmp/kip_bench/bench_w{w}.zarr"
        remove(path)
        s = distill(train, out=path, arch="fc:depth=3", ipc=10, steps=steps, target_batch=batch, workers=w,
                    learn_labels=True, checkpoint_every=10**6, progress=False)
        out[w] = s
    del info
    return {"part": "workers", "target_batch": batch, "steps": steps,
            "one_worker_seconds_per_step": out[1]["seconds_per_step"],
            "two_workers_seconds_per_step": out[2]["seconds_per_step"],
            "speedup": round(out[1]["seconds_per_step"] / out[2]["seconds_per_step"], 3),
            "comm_seconds_per_step": out[2]["comm_seconds_per_step"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="/tmp/kip_bench")
    p.add_argument("--parts", default="overhead,accuracy,workers")
    p.add_argument("--ipcs", default="10")
    p.add_argument("--overhead-steps", type=int, default=200)
    p.add_argument("--worker-steps", type=int, default=30)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    train, val = ensure_data(work)
    parts = args.parts.split(",")
    if "overhead" in parts:
        print(json.dumps(plain_loop_vs_ours(train, args.overhead_steps)), flush=True)
    if "accuracy" in parts:
        for ipc in (int(v) for v in args.ipcs.split(",")):
            print(json.dumps(accuracy(train, val, work, ipc)), flush=True)
    if "workers" in parts:
        print(json.dumps(workers(train, args.worker_steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
