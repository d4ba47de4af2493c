"""Where the time of one tile-wise KIP step goes, at ImageNet shape with 1,000 classes: target-row reads, K_ss
tiles, the LU factorisation of K_ss + lam I, K_ts with its gradient, dL/dK_ss and the vjp of the K_ss tiles,
plus the time and size of one checkpoint.

    .venv/bin/python benchmarks/kip_step_breakdown.py TRAIN.zarr --ipc 1,2,5,10 \\
        --json docs/results_kip_imagenet_scale.json

Runs the phases of ``kernelscale.kip.sharding.tiled_sums`` one after the other in this process (one worker:
the whole target batch, every tile), so each phase is timed on its own with all cores (the K_ss tiles and their
vjp are computed by the same kernel calls as ``kip.kss_tile``/``kss_tile_vjp``, compiled once for all tile
positions); the Ray actors of ``kernelscale distill --workers W --kss-tile T`` run the same worker code, the
K_ss tiles and the target batch split W ways, and the factorisation in the driver. One warm-up step compiles,
then ``--steps`` steps are timed (median per phase).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kip_imagenet_scale import dir_bytes, update_json


def breakdown(data_path: str, ipc: int, batch: int, tile: int, steps: int, seed: int = 0, reg: float = 1e-6,
              arch: str = "fc:depth=3") -> dict:
    from kernelscale.kip import step as kipmod
    from kernelscale.data import open_dataset
    from kernelscale.kip.store import create_distilled, empty_history
    from kernelscale.kernels import parse_arch
    from kernelscale.kip.targets import init_random, sampling_mode
    from kernelscale.kip.run import _commit
    from kernelscale.kip.sharding import LocalPool, ShardWorker, pair_kernel
    from kernelscale.kip.augment import TargetAugment

    data = open_dataset(data_path)
    spec = parse_arch(arch, "ntk")
    kern = pair_kernel(spec)
    mode = sampling_mode("auto", data)
    augment = TargetAugment.parse("auto", data.input_shape)
    worker = ShardWorker(data_path, spec.canonical(), lr=0.01, reg=reg, learn_labels=True, batch=batch, seed=seed,
                         augment=augment, sampling=mode)
    pool = LocalPool([worker])
    sampler = worker.sampler
    rows = init_random(data, ipc, seed)
    kip = kipmod.make_kip(kern, lr=0.01, reg=reg, learn_labels=True, total_steps=1000)
    state = kip.init(data.take(rows), data.one_hot(rows), seed)
    n = len(rows)
    tiles = kipmod.tile_pairs(n, tile)
    # K_ss tiles and their vjp as in kip.kss_tile / kss_tile_vjp, on host-sliced rows so that one compilation
    # serves every tile position (ShardWorker's jit with static tile bounds compiles once per position)
    block = jax.jit(lambda a, b: kern(a, b))
    block_sym = jax.jit(lambda a: kern(a, a))
    block_vjp = jax.jit(lambda a, b, cot: jax.vjp(kern, a, b)[1](cot))
    block_sym_vjp = jax.jit(lambda a, cot: jax.vjp(lambda v: kern(v, v), a)[1](cot)[0])
    phases: dict[str, list[float]] = {k: [] for k in ("read", "kss_tiles", "factor_solve", "target_terms",
                                                       "kss_cotangent", "kss_vjp", "apply", "step")}
    compile_step = None
    first_read_bytes = first_read_rows = 0
    for step in range(steps + 1):
        t = [time.perf_counter()]
        b0, r0 = sampler.bytes_read, sampler.rows_read
        x_t, _ = sampler.batch(step)  # the read alone (target_terms reads the same batch again, from its cache)
        t.append(time.perf_counter())
        first_read_bytes += sampler.bytes_read - b0
        first_read_rows += sampler.rows_read - r0
        x_s, y_s = np.asarray(state.x), np.asarray(state.y)
        blocks = [np.asarray(block_sym(x_s[r0:r1]) if (r0, r1) == (c0, c1) else block(x_s[r0:r1], x_s[c0:c1]))
                  for r0, r1, c0, c1 in tiles]
        k_ss = np.empty((n, n), np.float32)
        for (r0, r1, c0, c1), b in zip(tiles, blocks):
            k_ss[r0:r1, c0:c1] = b
            k_ss[c0:c1, r0:r1] = b.T
        t.append(time.perf_counter())
        factors = kipmod.factor_kss(jnp.asarray(k_ss), reg)
        alpha = np.asarray(kipmod.solve_kss(factors, jnp.asarray(y_s)))
        t.append(time.perf_counter())
        (part,) = pool.map("target_terms", [((x_s, y_s, np.asarray(state.key)), alpha, step)])
        t.append(time.perf_counter())
        grad_kss, gy = kipmod.kss_cotangent(jnp.asarray(k_ss), jnp.asarray(alpha), jnp.asarray(part.pop("u")), reg,
                                            factors)
        grad_kss = np.asarray(grad_kss)
        t.append(time.perf_counter())
        gx_tiles = np.zeros(x_s.shape, np.float32)
        for r0, r1, c0, c1 in tiles:
            cot = grad_kss[r0:r1, c0:c1]
            if (r0, r1) == (c0, c1):
                gx_tiles[r0:r1] += np.asarray(block_sym_vjp(x_s[r0:r1], cot))
            else:
                ga, gb = block_vjp(x_s[r0:r1], x_s[c0:c1], cot + grad_kss[c0:c1, r0:r1].T)
                gx_tiles[r0:r1] += np.asarray(ga)
                gx_tiles[c0:c1] += np.asarray(gb)
        t.append(time.perf_counter())
        sums = {"loss": part["loss"], "correct": part["correct"], "gx": part["gx"] + gx_tiles, "gy": np.asarray(gy)}
        state, metrics = kip.apply(state, sums, int(part["count"]))
        jax.block_until_ready(state)
        t.append(time.perf_counter())
        durations = np.diff(t)
        if step == 0:
            compile_step = float(t[-1] - t[0])
            continue
        for key, d in zip(("read", "kss_tiles", "factor_solve", "target_terms", "kss_cotangent", "kss_vjp", "apply"),
                          durations):
            phases[key].append(float(d))
        phases["step"].append(float(t[-1] - t[1]))  # a step without the extra read
    med = {k: round(float(np.median(v)), 3) for k, v in phases.items()}
    med["target_terms_compute"] = round(med["target_terms"] - med["read"], 3)
    # one checkpoint of this state, as distill writes it (checkpoint leaves + the support)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        out = str(Path(tmp) / "ckpt.zarr")
        store = create_distilled(out, n_support=n, input_shape=data.input_shape, num_classes=data.num_classes,
                                 support_rows=rows,
                                 attrs={"arch": spec.arch, "kernel": spec.kernel, "spec": spec.to_json(), "reg": reg,
                                        "input_shape": list(data.input_shape), "num_classes": data.num_classes})
        history = empty_history()
        history["loss"] = np.zeros(steps, np.float32)
        t0 = time.perf_counter()
        _commit(store, state, history, steps)
        ckpt_seconds = time.perf_counter() - t0
        ckpt_bytes = dir_bytes(Path(out) / "checkpoints")
        store_bytes = dir_bytes(Path(out))
    entries = {"k_ts": batch * n, "k_ss_tiles": sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles)}
    return {"ipc": ipc, "support": n, "target_batch": batch, "kss_tile": tile, "tiles": len(tiles),
            "sampling": mode, "steps_timed": steps, "warmup_step_seconds": round(compile_step, 2),
            "seconds": med, "kernel_entries": entries,
            "bytes_read_per_target_row": round(first_read_bytes / max(first_read_rows, 1), 1),
            "checkpoint_seconds": round(ckpt_seconds, 3), "checkpoint_bytes": ckpt_bytes,
            "distilled_store_bytes": store_bytes, "devices": [str(d) for d in jax.local_devices()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train")
    p.add_argument("--ipc", default="1,2,5,10")
    p.add_argument("--target-batch", type=int, default=2000)
    p.add_argument("--kss-tile", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2, help="timed steps per size (after one warm-up step)")
    p.add_argument("--json", help="add the results (key 'step_breakdown') to this JSON file")
    args = p.parse_args()
    rows = []
    for ipc in [int(v) for v in args.ipc.split(",")]:
        row = breakdown(args.train, ipc, args.target_batch, args.kss_tile, args.steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            update_json(args.json, step_breakdown=rows)


if __name__ == "__main__":
    main()
