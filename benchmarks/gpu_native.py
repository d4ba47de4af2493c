"""Native kernels on an accelerator, in one process (no Ray, Zarr or image folder needed there): float32 accuracy
against a float64 reference made on CPU, Gram-block throughput of fc-3, convnet-3 and Myrtle-5 at 32x32 for
several streamed step sizes, the time of a ConvNet KIP step (10 images per class, 500 target rows), and fc KIP
steps with 1,000 classes at supports of 1,000 to 10,000 images (``--parts kip1000``, synthetic rows).

    .venv/bin/python benchmarks/gpu_native.py --rows ROWS.npz --make-reference REF.npz   # any machine, float64
    python3 benchmarks/gpu_native.py --rows ROWS.npz --reference REF.npz --json OUT.json  # on the accelerator

ROWS.npz is the file ``benchmarks/cnn_experiments.py --export`` writes (uint8 CIFAR-10 rows and their
standardisation). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from cnn_experiments import load_rows

ARCHS = {"fc-3": "fc:depth=3", "convnet-3": "convnet:depth=3", "myrtle-5": "myrtle:depth=5"}


def make_reference(rows: str, out: str, n: int = 8) -> None:
    """K(a, a) and K(b, a) of n train rows a and n held-out rows b, float64 JAX path, per architecture."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from kernelscale.kernels import native
    from kernelscale.kernels import parse_arch

    loaded = load_rows(rows)
    xtr, xva = loaded["train_x"], loaded["val_x"]
    a, b = xtr[:n].astype(np.float64), xva[:n].astype(np.float64)
    ref: dict[str, np.ndarray] = {"a": xtr[:n], "b": xva[:n]}
    for name, arch in ARCHS.items():
        fn = native.kernel_fn(parse_arch(arch, "ntk"))
        ref[f"{name}_aa"] = np.asarray(fn(a, None, "ntk"))
        ref[f"{name}_ba"] = np.asarray(fn(b, a, "ntk"))
        print(name, "done", flush=True)
    np.savez(out, **ref)


def accuracy(ref_path: str) -> dict:
    """max |K32 - K64| / max |K64| of the float32 kernel on this backend, on and off the diagonal."""
    from kernelscale.kernels import native
    from kernelscale.kernels import parse_arch

    ref = np.load(ref_path)
    out = {}
    for name, arch in ARCHS.items():
        fn = native.kernel_fn(parse_arch(arch, "ntk"))
        aa = np.asarray(fn(ref["a"], None, "ntk"), np.float64)
        ba = np.asarray(fn(ref["b"], ref["a"], "ntk"), np.float64)
        k_aa, k_ba = ref[f"{name}_aa"], ref[f"{name}_ba"]
        scale = np.abs(k_aa).max()
        out[name] = {"diagonal": float(np.abs(np.diag(aa) - np.diag(k_aa)).max() / scale),
                     "off_diagonal": float(max(np.abs(aa - k_aa).max(), np.abs(ba - k_ba).max()) / scale)}
    return out


def throughput(x: np.ndarray, name: str, rows: int, steps: list[int | None], repeats: int = 2) -> dict:
    """Pairs per second of one (rows x rows) block call, per streamed step size (None: the default)."""
    import jax

    from kernelscale.kernels import native
    from kernelscale.kernels import parse_arch

    from kernelscale.kernels.native._api import pairs_per_step

    spec = parse_arch(ARCHS[name], "ntk")
    out = {}
    for step in steps:
        fn = native.kernel_fn(spec, step=step) if step else native.kernel_fn(spec)
        f = jax.jit(lambda a, b: fn(a, b, "ntk"))
        a, b = x[:rows], x[rows : 2 * rows]
        t = time.perf_counter()
        f(a, b).block_until_ready()
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(repeats):
            f(a, b).block_until_ready()
        sec = (time.perf_counter() - t) / repeats
        key = str(step or f"default={pairs_per_step(spec, x.shape[1:])}")
        out[key] = {"pairs_per_s": round(rows * rows / sec, 1), "block_seconds": round(sec, 4),
                    "first_call_seconds": round(compile_s, 2)}
        print(name, key, out[key], flush=True)
    return out


def versus_neural_tangents(x: np.ndarray, name: str, rows: int, repeats: int = 3) -> dict:
    """The same (rows x rows) block through neural-tangents' jitted ``kernel_fn`` (stax.Relu) and the native
    kernel: seconds and pairs per second of each, their ratio and max relative difference."""
    import jax

    from kernelscale import kernels
    from kernelscale.kernels import native
    from kernelscale.kernels import parse_arch

    spec = parse_arch(ARCHS[name], "ntk")
    a = x[:rows]
    out: dict = {"rows": rows}
    for label, fn in (("neural_tangents", kernels.kernel_fn(spec, fast=False, native=False)),
                      ("kernelscale", native.kernel_fn(spec))):
        f = jax.jit(lambda u, v: fn(u, v, "ntk"))
        k = f(a, a).block_until_ready()
        t = time.perf_counter()
        for _ in range(repeats):
            k = f(a, a).block_until_ready()
        sec = (time.perf_counter() - t) / repeats
        out[label] = {"seconds": round(sec, 4), "pairs_per_s": round(rows * rows / sec, 1)}
        out[f"{label}_k"] = np.asarray(k, np.float64)
    diff = np.abs(out.pop("neural_tangents_k") - out["kernelscale_k"]).max() / np.abs(out.pop("kernelscale_k")).max()
    out["max_relative_difference"] = float(diff)
    out["ratio"] = round(out["neural_tangents"]["seconds"] / out["kernelscale"]["seconds"], 1)
    print(name, out, flush=True)
    return out


def kip_step(x: np.ndarray, labels: np.ndarray, ipc: int = 10, target: int = 500, steps: int = 3) -> dict:
    """Seconds per ConvNet-3 KIP step (support ipc x 10 images, ``target`` rows, gradients through JAX)."""
    from kernelscale.kernels import native
    from kernelscale.kernels import parse_arch
    from kernelscale.kip.step import make_kip

    fn = native.kernel_fn(parse_arch("convnet:depth=3", "ntk"))
    kip = make_kip(lambda a, b: fn(a, b, "ntk"), lr=0.01, learn_labels=True)
    idx = np.concatenate([np.flatnonzero(labels == c)[:ipc] for c in range(10)])
    y = np.eye(10, dtype=np.float32)[labels] - 0.1
    times, loss = timed_steps(kip, kip.init(x[idx], y[idx]), x, y, target, steps, np.random.default_rng(0))
    return {"support": len(idx), "target_batch": target, "first_step_seconds": round(times[0], 2),
            "seconds_per_step": round(float(np.mean(times[1:])), 3), "loss": loss}


def timed_steps(kip, state, x: np.ndarray, y: np.ndarray, target: int, steps: int, rng: np.random.Generator
                ) -> tuple[list[float], float]:
    """Wall seconds of ``steps + 1`` KIP updates on random ``target``-row batches of (x, y) (the first compiles),
    and the last step's loss."""
    import jax
    import jax.numpy as jnp

    times, loss = [], float("nan")
    for _ in range(steps + 1):
        t_idx = rng.choice(len(x), target, replace=False)
        t = time.perf_counter()
        state, metrics = kip.update(state, (jnp.asarray(x[t_idx]), jnp.asarray(y[t_idx])))
        jax.block_until_ready(state.x)
        times.append(time.perf_counter() - t)
        loss = float(metrics["loss"])
    return times, loss


def kip_thousand_classes(supports: list[int], target: int = 2000, classes: int = 1000, steps: int = 3) -> dict:
    """Seconds per fc-3 KIP step (labels learned, whole K_ss and its solve in one process) with ``classes``
    classes, for each support size; synthetic N(0, 1) 32x32x3 rows (the cost does not depend on their values)."""
    import jax

    from kernelscale.kernels import native
    from kernelscale.kernels import parse_arch
    from kernelscale.kip.step import make_kip

    fn = native.kernel_fn(parse_arch("fc:depth=3", "ntk"))
    kip = make_kip(lambda a, b: fn(a, b, "ntk"), lr=0.01, learn_labels=True)
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(10 * target, 32, 32, 3)).astype(np.float32)
    y_pool = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, len(pool))] - 1.0 / classes
    runs = []
    for s in supports:
        state = kip.init(rng.normal(size=(s, 32, 32, 3)).astype(np.float32),
                         np.eye(classes, dtype=np.float32)[np.arange(s) % classes] - 1.0 / classes)
        times, _ = timed_steps(kip, state, pool, y_pool, target, steps, rng)
        mem = jax.devices()[0].memory_stats() or {}
        runs.append({"support": s, "first_step_s": round(times[0], 2), "seconds_per_step": round(float(np.median(times[1:])), 4),
                     "peak_device_gib": round(mem.get("peak_bytes_in_use", 0) / 2**30, 2)})
        print(json.dumps(runs[-1]), flush=True)
    return {"classes": classes, "target_batch": target, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", help="cnn_experiments --export file (every part but kip1000 needs it)")
    p.add_argument("--make-reference", metavar="REF.npz")
    p.add_argument("--reference", metavar="REF.npz")
    p.add_argument("--parts", default="accuracy,throughput,kip")
    p.add_argument("--json", metavar="OUT.json")
    args = p.parse_args()
    if args.make_reference:
        if not args.rows:
            p.error("--make-reference needs --rows ROWS.npz")
        make_reference(args.rows, args.make_reference)
        return
    import jax

    res: dict = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    parts = args.parts.split(",")

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)

    if not args.rows and set(parts) - {"kip1000"}:
        p.error("--rows ROWS.npz is needed for the accuracy, throughput, nt and kip parts")
    loaded = load_rows(args.rows) if args.rows else {}
    xtr, ytr = loaded.get("train_x"), loaded.get("train_labels")
    if "accuracy" in parts and args.reference:
        res["accuracy"] = accuracy(args.reference)
        print(json.dumps(res["accuracy"]), flush=True)
        save()
    if "throughput" in parts:
        res["throughput"] = {}
        for name, rows, steps in (("fc-3", 2048, [None]), ("convnet-3", 500, [None, 2048]), ("myrtle-5", 100, [None])):
            res["throughput"][name] = throughput(xtr, name, rows, steps)
            save()
    if "nt" in parts:
        res["versus_neural_tangents"] = {}
        for name, rows in (("convnet-3", 32), ("myrtle-5", 8)):
            try:
                res["versus_neural_tangents"][name] = versus_neural_tangents(xtr, name, rows)
            except Exception as exc:  # noqa: BLE001 - report, go on with the other parts
                res["versus_neural_tangents"][name] = {"error": repr(exc)[:300]}
            save()
    if "kip" in parts:
        res["kip_convnet"] = kip_step(xtr, ytr)
        save()
    if "kip1000" in parts:
        res["kip_1000_classes"] = kip_thousand_classes([1000, 2000, 5000, 10000])
        save()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
