"""KIP benchmark: accuracy with the command's defaults, step time vs a plain loop, 2-worker speedup.

Run under the benchmark lock (timings are only comparable when nothing else is timed at once):

    flock /tmp/kernelscale-bench.lock .venv/bin/python benchmarks/bench_kip.py --work /tmp/kip_bench \
        [--parts overhead,accuracy,workers,gram,convnet,tiled] [--ipcs 10,1,50]

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

    from kernelscale.kip import step as kipmod
    from kernelscale.data import open_dataset
    from kernelscale.kernels import kernel_fn, parse_arch
    from kernelscale.kip.targets import TargetSampler, init_random
    from kernelscale.kip.sharding import pair_kernel
    from kernelscale.kip.augment import TargetAugment

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
    augmented = TargetSampler(data, batch, 0, augment=TargetAugment.parse("auto", data.input_shape))
    # kernelscale's step on plain targets, and on the command's default (targets translated in the prefetch thread)
    ours = {"plain": {"sampler": TargetSampler(data, batch, 0), "state": kip.init(x0, y0), "times": []},
            "augmented": {"sampler": augmented, "state": kip.init(x0, y0), "times": []}}
    plain_times = []
    block = 25
    for rep in range(steps // block):
        for _ in range(block):
            t0 = time.perf_counter()
            idx = rng.choice(data.n, batch, replace=False)
            params, opt_state, loss = plain_step(params, opt_state, x_all[idx], y_all[idx])
            float(loss)
            plain_times.append(time.perf_counter() - t0)
        for run in ours.values():
            batches = run["sampler"].iterate(rep * block, (rep + 1) * block)
            for _ in range(block):
                t0 = time.perf_counter()
                run["state"], metrics = kip.update(run["state"], next(batches))
                float(metrics["loss"])
                run["times"].append(time.perf_counter() - t0)
    plain = statistics.median(plain_times[block:])
    ours_plain, ours_aug = (statistics.median(run["times"][block:]) for run in ours.values())
    return {"part": "overhead", "steps_each": len(plain_times), "target_batch": batch,
            "plain_seconds_per_step": round(plain, 5), "ours_seconds_per_step": round(ours_plain, 5),
            "ratio_ours_over_plain": round(ours_plain / plain, 4),
            "ours_augmented_seconds_per_step": round(ours_aug, 5), "augmentation": augmented.augment.describe(),
            "ratio_augmented_over_plain": round(ours_aug / plain, 4)}


def _cli(argv: list[str]) -> tuple[int, dict, float]:
    """Run ``kernelscale ARGV --json --no-progress`` in-process: (exit code, summary, wall seconds)."""
    import contextlib
    import io

    from kernelscale.cli import main

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = main(argv + ["--json", "--no-progress"])
    return code, json.loads(buf.getvalue().strip().splitlines()[-1]), time.perf_counter() - t0


def accuracy(train: str, val: str, work: Path, ipc: int, extra: list[str] | None = None, tag: str = "") -> dict:
    """``kernelscale distill`` with its DEFAULT steps/lr/target batch, labels learned, reg 1e-6; val accuracy."""
    from kernelscale.storage import remove

    out = work / f"bench_ipc{ipc}{tag}.zarr"
    remove(str(out))
    argv = ["distill", train, "--arch", "fc:depth=3", "--kernel", "ntk", "--ipc", str(ipc), "--learn-labels",
            "--reg", "1e-6", "--val", val, "--out", str(out), *(extra or [])]
    code, summary, wall = _cli(argv)
    keep = ("val_accuracy", "val_accuracy_init", "history", "seconds_per_step", "steps", "lr", "label_lr", "schedule",
            "target_batch", "target_augment", "label_solve_floor", "full_krr_ceiling", "train_seconds")
    return {"part": "accuracy", "ipc": ipc, "exit_code": code, "command": "kernelscale " + " ".join(argv),
            "wall_seconds": round(wall, 1), **{k: summary.get(k) for k in keep}}


def gram_floor_ceiling(work: Path, val: str, rows: int = 5000) -> dict:
    """``--init gram`` with the label-solve floor and the full-KRR ceiling, on a class-balanced subset of the
    TRAIN split (the full 45,000-row Gram is 8 GB): the subset's pixels are written to an .npz and ingested
    with ``--stats-from TRAIN`` (same inputs, compatible with VAL), ``kernelscale gram`` computes its Gram, and
    ``kernelscale distill --init gram --gram`` runs with the defaults (and ``--init random`` for comparison)."""
    from kernelscale.data import balanced_subset, open_dataset
    from kernelscale.storage import remove

    train = str(work / "cifar_std_train.zarr")
    src = open_dataset(train)
    npz, sub, gram = work / f"sub{rows}.npz", str(work / f"cifar_sub{rows}.zarr"), str(work / f"cifar_sub{rows}_gram.zarr")
    idx = np.sort(balanced_subset(src.labels, rows, 0))
    pixels = np.round(np.clip(src.affine.invert(src.take(idx)), 0, 1) * 255).astype(np.uint8)
    np.savez(npz, images=pixels, labels=src.labels[idx], class_names=np.array(src.class_names))
    remove(sub)
    out: dict = {"part": "gram", "rows": rows}
    code, s, _ = _cli(["ingest", str(npz), sub, "--stats-from", train])
    assert code == 0, s
    out["max_abs_input_difference_vs_train"] = float(np.abs(open_dataset(sub).rows(0, 200) - src.take(idx[:200])).max())
    gram_argv = ["gram", sub, "--arch", "fc:depth=3", "--kernel", "ntk", "--out", gram, "--overwrite"]
    code, s, wall = _cli(gram_argv)
    out.update({"gram_command": "kernelscale " + " ".join(gram_argv), "gram_exit_code": code,
                "gram_wall_seconds": round(wall, 1)})
    for init in ("gram", "random"):
        extra = ["--gram", gram] + (["--init", "gram"] if init == "gram" else [])
        out[f"init_{init}"] = accuracy(sub, val, work, 10, extra, tag=f"_sub_{init}")
    return out


def convnet(work: Path, size: int, steps: int, batch: int, ipc: int = 1) -> dict:
    """The convnet NTK (3 conv+ReLU+pool blocks) on CIFAR resized to ``size`` x ``size``: a short KIP run."""
    from kernelscale.storage import remove

    train, val = work / f"cifar{size}_train.zarr", work / f"cifar{size}_val.zarr"
    if not train.exists() or not val.exists():
        code, s, _ = _cli(["ingest", str(CIFAR), str(train), "--resize", f"{size}x{size}", "--val-fraction", "0.1",
                           "--val-out", str(val), "--preprocess", "standardize", "--overwrite"])
        assert code == 0, s
    out_path = work / f"bench_convnet{size}.zarr"
    remove(str(out_path))
    argv = ["distill", str(train), "--arch", "convnet", "--kernel", "ntk", "--ipc", str(ipc), "--learn-labels",
            "--steps", str(steps), "--target-batch", str(batch), "--val", str(val), "--eval-every", str(steps),
            "--out", str(out_path)]
    code, s, wall = _cli(argv)
    return {"part": "convnet", "size": size, "ipc": ipc, "exit_code": code, "command": "kernelscale " + " ".join(argv),
            "wall_seconds": round(wall, 1), **{k: s.get(k) for k in ("val_accuracy", "val_accuracy_init", "target_augment",
                                                                      "seconds_per_step", "first_step_seconds")}}


def tiled(train: str, work: Path, steps: int = 10, tile: int = 50) -> dict:
    """``--kss-tile`` from the CLI (ipc 10, K_ss in 50 x 50 tiles) against the fused step: same result, step time."""
    from kernelscale.kip.store import open_distilled
    from kernelscale.storage import remove

    res = {}
    for name, extra in (("fused", []), ("tiled", ["--kss-tile", str(tile)])):
        path = str(work / f"bench_{name}.zarr")
        remove(path)
        code, s, _ = _cli(["distill", train, "--arch", "fc:depth=3", "--ipc", "10", "--learn-labels", "--steps",
                           str(steps), "--out", path, *extra])
        res[name] = (s.get("seconds_per_step"), open_distilled(path).support()[0])
    return {"part": "tiled", "tile": tile, "steps": steps, "fused_seconds_per_step": res["fused"][0],
            "tiled_seconds_per_step": res["tiled"][0],
            "max_abs_support_difference": float(np.abs(res["fused"][1] - res["tiled"][1]).max())}


def workers(train: str, steps: int, batch: int = 8000) -> dict:
    """Step time with 1 worker (in-process) and 2 Ray actors at target batch 8,000; communication per step."""
    from kernelscale.kip.run import distill
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
    p.add_argument("--gram-rows", type=int, default=5000)
    p.add_argument("--conv-size", type=int, default=8)
    p.add_argument("--conv-steps", type=int, default=200)
    p.add_argument("--conv-batch", type=int, default=100)
    p.add_argument("--conv-ipc", type=int, default=1, help="support images per class of the convnet run (10 "
                   "support images keep a CPU step near 1.5 s; 10 per class would be ~30 s)")
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
    if "gram" in parts:
        print(json.dumps(gram_floor_ceiling(work, val, args.gram_rows)), flush=True)
    if "convnet" in parts:
        print(json.dumps(convnet(work, args.conv_size, args.conv_steps, args.conv_batch, args.conv_ipc)), flush=True)
    if "tiled" in parts:
        print(json.dumps(tiled(train, work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
