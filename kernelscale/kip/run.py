"""A whole KIP run (``kernelscale distill``) and kernel regression from a support set (``kernelscale evaluate``).

Checks every input before any compute, initialises (or resumes) the support, runs the steps (in-process for
one worker, sharded over Ray actors otherwise), evaluates on a validation store every E steps, commits
checkpoints every C steps and writes the result, an image grid and loss/accuracy curves.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from kernelscale.kip import step as kipmod
from kernelscale import storage
from kernelscale.data import DatasetStore, open_dataset
from kernelscale.kip.store import DistilledStore, create_distilled, empty_history, open_distilled
from kernelscale.errors import InputError, NotConvergedError, StoreError
from kernelscale.kernels import KernelSpec, check_input_shape, load_spec, parse_arch
from kernelscale.kip.targets import (DEFAULT_MEMORY_LIMIT, SAMPLING_MODES, TargetSampler, check_gram, check_ipc, init_gram,
                       init_random, label_solve, sampling_mode)
from kernelscale.kip.sharding import LocalPool, RayPool, ShardWorker, pair_kernel, sharded_sums, tiled_sums
from kernelscale.kip.augment import TargetAugment

log = logging.getLogger(__name__)

#: Settings that must match for --resume to continue a run (steps may grow).
RESUME_KEYS = ("spec", "reg", "lr", "label_lr", "schedule", "learn_labels", "ipc", "target_batch", "seed", "init",
               "dataset_fingerprint", "adversarial", "target_augment", "target_sampling")
#: What a store written before a resume key existed was made with (so older runs still resume).
RESUME_DEFAULTS = {"target_augment": "none", "target_sampling": "rows"}
CEILING_MAX_ROWS = 6000  # full-data kernel regression from the stored Gram only up to this many DATA rows


# ----------------------------------------------------------------------------------------------------------
# Kernel regression from a support set
# ----------------------------------------------------------------------------------------------------------


class Evaluator:
    """Accuracy and mse of kernel regression from a support set onto a dataset store (rows in batches).

    mse is the mean over rows and label columns of (prediction - (one-hot - 1/C))^2.
    """

    def __init__(self, store: DatasetStore, batch: int = 2048, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self.store, self.batch = store, batch
        nbytes = store.n * int(np.prod(store.input_shape)) * 4
        self.cached = [rows for _, rows in store.iter_rows(batch)] if nbytes <= memory_limit else None

    def __call__(self, kernel: kipmod.PairKernel, x_s: Any, y_s: Any, reg: float) -> dict[str, float]:
        predict = kipmod.predict_fn(kernel, x_s, y_s, reg)
        blocks = self.cached if self.cached is not None else (r for _, r in self.store.iter_rows(self.batch))
        correct = sq = n = 0.0
        start = 0
        for rows in blocks:
            labels = self.store.labels[start : start + len(rows)]
            s = kipmod.score(np.asarray(predict(rows)), labels, self.store.num_classes)
            correct, sq, n = correct + s["correct"], sq + s["sq_error"], n + s["n"]
            start += len(rows)
        return {"accuracy": correct / max(n, 1), "mse": sq / max(n * self.store.num_classes, 1), "n": int(n)}


def check_compatible(data_like: dict[str, Any], other: DatasetStore, flag: str) -> None:
    """``other`` must have the same input shape, preprocessing and classes as the data the support came from."""
    if tuple(data_like["input_shape"]) != other.input_shape:
        raise InputError(f"{flag} {other.path} has rows of shape {other.input_shape}, the support has "
                         f"{tuple(data_like['input_shape'])}; ingest it with the same --resize")
    if data_like["preprocess_digest"] != other.affine.digest():
        raise InputError(f"{flag} {other.path} was preprocessed differently from DATA; ingest it with "
                         f"--stats-from DATA.zarr (or as DATA's --val-out split)")
    if int(data_like["num_classes"]) != other.num_classes:
        raise InputError(f"{flag} {other.path} has {other.num_classes} classes, the support has {data_like['num_classes']}")


def open_support(distilled: str, test: str, allow_code: bool = False
                 ) -> tuple[dict[str, Any], DatasetStore, KernelSpec, np.ndarray, np.ndarray]:
    """``(attrs, test store, kernel spec, support x, support labels)`` of a distilled store, checked against TEST.

    The stored kernel spec is untrusted input (:func:`kernelscale.kernels.load_spec`): user code in it is refused
    unless ``allow_code`` (``--allow-code``), and then loaded only if its source hash matches.
    """
    store = open_distilled(distilled)
    attrs = store.attrs
    spec = load_spec(attrs["spec"], allow_code=allow_code, where=distilled)
    test_store = open_dataset(test)
    check_compatible(attrs, test_store, "--test")
    test_store.check_content()
    x_s, y_s = store.support()
    return attrs, test_store, spec, x_s, y_s


def evaluate(distilled: str, test: str, batch: int = 2048, allow_code: bool = False) -> dict[str, Any]:
    """Kernel regression from a distilled support set onto TEST: ``accuracy``, ``mse`` (see :class:`Evaluator`)."""
    attrs, test_store, spec, x_s, y_s = open_support(distilled, test, allow_code)
    t0 = time.perf_counter()
    result = Evaluator(test_store, batch)(pair_kernel(spec), x_s, y_s, float(attrs["reg"]))
    return {"distilled": distilled, "test": test, "n_support": int(len(x_s)), "steps_done": attrs.get("steps_done"),
            "accuracy": result["accuracy"], "mse": result["mse"], "n": result["n"],
            "kernel": spec.describe(), "eval_seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------------------------------


def _check_args(args: dict[str, Any]) -> None:
    for name, low in (("ipc", 1), ("target_batch", 1), ("workers", 1), ("checkpoint_every", 1), ("eval_every", 1)):
        if args[name] < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {args[name]}")
    if args["steps"] < 0:
        raise InputError(f"--steps must be >= 0, got {args['steps']}")
    if not (args["lr"] > 0 and math.isfinite(args["lr"])):
        raise InputError(f"--lr must be a positive number, got {args['lr']}")
    if not (args["reg"] >= 0 and math.isfinite(args["reg"])):
        raise InputError(f"--reg must be >= 0, got {args['reg']}")
    if args["init"] not in ("random", "gram"):
        raise InputError(f"--init must be random or gram, got {args['init']!r}")
    if args["init"] == "gram" and not args["gram"]:
        raise InputError("--init gram needs --gram GRAM.zarr (the stored Gram of DATA)")
    if args["kss_tile"] is not None and args["kss_tile"] < 1:
        raise InputError(f"--kss-tile must be >= 1, got {args['kss_tile']}")
    if args["label_lr"] is not None and not (args["label_lr"] > 0 and math.isfinite(args["label_lr"])):
        raise InputError(f"--label-lr must be a positive number, got {args['label_lr']}")
    if args["schedule"] not in kipmod.SCHEDULES:
        raise InputError(f"--schedule must be one of {', '.join(kipmod.SCHEDULES)}, got {args['schedule']!r}")


def _plots(out: str, store: DistilledStore, data: DatasetStore, x: np.ndarray, ipc: int) -> dict[str, str]:
    """Write ``<out>_images.png`` (support rows per class, un-preprocessed) and ``<out>_curves.png``."""
    if storage.is_url(out):
        return {}
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = plot_paths(out)
    store.group.attrs["plots"] = list(paths.values())  # ours: a --resume may replace them
    pixels = np.clip(data.affine.invert(x), 0.0, 1.0)
    c, cols = data.num_classes, min(ipc, 10)
    fig, axes = plt.subplots(c, cols, figsize=(cols * 1.1, c * 1.1), squeeze=False)
    for k in range(c):
        for j in range(cols):
            ax = axes[k][j]
            img = pixels[k * ipc + j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(data.class_names[k][:10], fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["images_png"], dpi=80)
    plt.close(fig)
    hist = store.history()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lines = ax.plot(np.arange(len(hist["loss"])), hist["loss"], lw=0.8, label="target-batch loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_yscale("log")
    if len(hist["val_step"]):
        ax2 = ax.twinx()
        lines += ax2.plot(hist["val_step"], hist["val_accuracy"], "o-", color="C1", label="val accuracy")
        ax2.set_ylabel("val accuracy")
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    ax.set_title(f"KIP: {store.attrs.get('arch', '')} {store.attrs.get('kernel', '')} kernel, {ipc} images per class",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["curves_png"], dpi=80)
    plt.close(fig)
    return paths


def distill(data_path: str, *, out: str, arch: str = "fc", kernel: str = "ntk", ipc: int = 10, steps: int = 6000,
            target_batch: int = 2000, lr: float = 0.01, label_lr: float | None = None, schedule: str = "cosine",
            learn_labels: bool = False, reg: float = 1e-6,
            workers: int = 1, seed: int = 0, init: str = "random", gram: str | None = None, val: str | None = None,
            eval_every: int = 500, checkpoint_every: int = 500, resume: bool = False, progress: bool = True,
            kss_tile: int | None = None, memory_limit: int = DEFAULT_MEMORY_LIMIT, target_augment: str = "auto",
            target_transform: kipmod.TargetTransform | None = None,
            adversarial: str | None = None, pgd_steps: int = 10, adv_mix: float = 1.0,
            overwrite: bool = False, target_sampling: str = "auto") -> dict[str, Any]:
    """Run KIP on DATA (see ``kernelscale distill --help``); returns the JSON summary.

    Raises :class:`NotConvergedError` (exit 3) when the loss becomes non-finite: the last good checkpoint stays.
    """
    t_start = time.perf_counter()
    _check_args(dict(locals()))
    data = open_dataset(data_path)
    spec = parse_arch(arch, kernel)
    check_input_shape(spec, data.input_shape)
    check_ipc(data, ipc)
    augment = TargetAugment.parse(target_augment, data.input_shape)
    if target_sampling not in SAMPLING_MODES:
        raise InputError(f"--target-sampling must be {', '.join(SAMPLING_MODES)}, got {target_sampling!r}")
    data.check_rows()  # NaN/Inf rows or corrupt chunks are refused before any compute
    data.check_content()  # and rows/labels edited behind the fingerprint's back (sampled chunks)
    if data.num_classes < 2:
        raise InputError(f"{data_path}: KIP needs at least 2 classes, found {data.num_classes}")
    data_like = {"input_shape": list(data.input_shape), "preprocess_digest": data.affine.digest(),
                 "num_classes": data.num_classes}
    val_store = open_dataset(val) if val else None
    if val_store is not None:
        check_compatible(data_like, val_store, "--val")
    gram_store = None
    if gram:
        from kernelscale.gram.store import open_gram  # noqa: PLC0415

        gram_store = open_gram(gram)
        check_gram(gram_store, data, spec.canonical())
    label_lr = lr if label_lr is None else label_lr
    adv = None  # adversarial KIP (kernelscale.kip.adversarial): PGD target batches against the support
    if adversarial:
        from kernelscale.kip.adversarial import AdversarialTargets  # noqa: PLC0415

        if target_transform is not None:
            raise InputError("pass either adversarial= or target_transform=, not both")
        adv = target_transform = AdversarialTargets.build(adversarial, pgd_steps, adv_mix, spec, reg, data.affine)
    config = {"spec": spec.to_json(), "reg": reg, "lr": lr, "label_lr": label_lr, "schedule": schedule,
              "schedule_steps": max(steps, 1), "learn_labels": bool(learn_labels), "ipc": ipc, "target_batch": target_batch,
              "seed": seed, "init": init, "dataset_fingerprint": data.fingerprint,
              "target_augment": augment.describe()}
    config["adversarial"] = adv.config() if adv is not None else None
    if target_sampling == "auto" and resume and storage.exists(out):  # auto continues as the run began
        begun = open_distilled(out).attrs.get("config", {})
        target_sampling = begun.get("target_sampling", RESUME_DEFAULTS["target_sampling"])
    config["target_sampling"] = sampling_mode(target_sampling, data, memory_limit)
    storage.check_disjoint(out, [("DATA", data_path), ("--val", val), ("--gram", gram)], "--out")
    exists = storage.exists(out)
    if exists and not resume:
        raise InputError(f"{out} already exists; pass --resume to continue it, or choose another --out")
    check_plot_paths(out, resume, overwrite)
    if resume and not exists:
        raise InputError(f"--resume: {out} does not exist; run without --resume to start")
    store: DistilledStore | None = None
    if resume:
        store = open_distilled(out, "r+")
        old = store.attrs.get("config", {})
        diff = [k for k in RESUME_KEYS if old.get(k, RESUME_DEFAULTS.get(k)) != config[k]]
        if diff:
            raise InputError(f"--resume: {out} was made with other settings ({', '.join(diff)} differ); "
                             "use the same flags or another --out")
        # The learning-rate schedule spans this invocation's --steps: resuming with the same --steps (after a
        # kill) reproduces the uninterrupted run exactly; a larger --steps stretches the schedule to the new end.

    # -- support and state ----------------------------------------------------------------------------
    kern = pair_kernel(spec)
    if store is not None:
        rows = np.asarray(store.group["support_rows"][...], np.int64)
    elif init == "gram":
        assert gram_store is not None
        rows = init_gram(data, gram_store, ipc, seed)
    else:
        rows = init_random(data, ipc, seed)
    kip = kipmod.make_kip(kern, lr=lr, reg=reg, learn_labels=learn_labels, label_lr=label_lr, schedule=schedule,
                          total_steps=config["schedule_steps"], target_transform=target_transform)
    state = kip.init(data.take(rows), data.one_hot(rows), seed)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    history = empty_history()
    start = 0
    if store is not None:
        found = store.latest_checkpoint([np.asarray(v) for v in leaves])
        if found is not None:
            start, saved, history = found
            state = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in saved])
            log.info("resuming %s from its checkpoint at step %d", out, start)
    else:
        store = create_distilled(
            out, n_support=len(rows), input_shape=data.input_shape, num_classes=data.num_classes, support_rows=rows,
            attrs={"arch": spec.arch, "kernel": spec.kernel, "spec": spec.to_json(), "reg": reg,
                   "dataset_fingerprint": data.fingerprint, "dataset": data_path, "class_names": data.class_names,
                   "config": config, **data_like})
    evaluator = Evaluator(val_store, memory_limit=memory_limit) if val_store is not None else None
    summary: dict[str, Any] = {"out": out, "kernel": spec.describe(), "n_support": int(len(rows)), "ipc": ipc,
                               "steps": steps, "start_step": start, "target_batch": target_batch, "lr": lr,
                               "label_lr": label_lr, "schedule": schedule, "reg": reg, "kss_tile": kss_tile,
                               "learn_labels": bool(learn_labels), "workers": workers, "init": init,
                               "target_augment": augment.describe(), "target_sampling": config["target_sampling"]}

    if adv is not None:
        summary["adversarial"] = adv.describe()

    # -- floor / ceiling from a stored Gram -------------------------------------------------------------
    if gram_store is not None:
        summary.update(_floor_and_ceiling(data, gram_store, rows, reg, kern, evaluator))

    def val_accuracy(step: int) -> None:
        if evaluator is None:
            return
        res = evaluator(kern, state.x, state.y, reg)
        history["val_step"] = np.append(history["val_step"], step).astype(np.int64)
        history["val_accuracy"] = np.append(history["val_accuracy"], res["accuracy"]).astype(np.float32)
        log.info("step %d: val accuracy %.4f", step, res["accuracy"])

    if start == 0 and evaluator is not None and len(history["val_step"]) == 0:
        val_accuracy(0)

    # -- steps ----------------------------------------------------------------------------------------
    pool: LocalPool | RayPool | None = None
    sampler = None
    ray_info: dict[str, Any] = {}
    if workers == 1 and kss_tile is None:
        sampler = TargetSampler(data, target_batch, seed, memory_limit, augment, config["target_sampling"])
    else:
        worker_kwargs = dict(lr=lr, reg=reg, learn_labels=learn_labels, batch=target_batch, seed=seed, parts=workers,
                             memory_limit=memory_limit, target_transform=target_transform, augment=augment,
                             sampling=config["target_sampling"])
        if workers == 1:
            pool = LocalPool([ShardWorker(data_path, spec.canonical(), part=0, **worker_kwargs)])
        else:
            from kernelscale.runtime import ensure_ray  # noqa: PLC0415

            ray_info = ensure_ray()
            path = os.path.abspath(data_path) if not storage.is_url(data_path) else data_path
            pool = RayPool(lambda w: ((path, spec.canonical()), dict(worker_kwargs, part=w)), workers)
    step_times: list[float] = []
    comm_times: list[float] = []
    losses = list(history["loss"])
    bar = tqdm(total=max(0, steps - start), desc="kip", unit="step", disable=not progress)
    batches = sampler.iterate(start, steps) if sampler is not None else None
    last_good = start
    completed = start  # steps whose update is in ``state``
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            if batches is not None:
                x_t, y_t = next(batches)
                new_state, metrics = kip.update(state, (x_t, y_t))
            else:
                assert pool is not None
                if kss_tile is not None:
                    sums, count, timing = tiled_sums(pool, state, step, kss_tile, reg)
                else:
                    sums, count, timing = sharded_sums(pool, state, step)
                    comm_times.append(timing["comm"])
                new_state, metrics = kip.apply(state, sums, count)
            loss = float(metrics["loss"])
            step_times.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                err = NotConvergedError(
                    f"KIP loss became non-finite ({loss}) at step {step}; stopped. The last good checkpoint "
                    f"(step {store.attrs.get('checkpoint')}) is kept in {out}. Lower --lr or raise --reg.")
                err.summary = summary | {"status": "non-finite", "failed_step": step,
                                         "checkpoint": store.attrs.get("checkpoint")}
                raise err
            losses.append(loss)
            state = new_state
            done = completed = step + 1
            bar.update(1)
            if evaluator is not None and (done % eval_every == 0 or done == steps):
                history["loss"] = np.asarray(losses, np.float32)
                val_accuracy(done)
            if done % checkpoint_every == 0 or done == steps:
                history["loss"] = np.asarray(losses, np.float32)
                _commit(store, state, history, done)
                last_good = done
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI: keep every finished step for --resume
        if completed > last_good:
            history["loss"] = np.asarray(losses[:completed], np.float32)
            _commit(store, state, history, completed)
            log.warning("interrupted: checkpoint written at step %d of %d in %s", completed, steps, out)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
        if ray_info:
            from kernelscale.runtime import shutdown_if_started  # noqa: PLC0415

            shutdown_if_started(ray_info)
    history["loss"] = np.asarray(losses, np.float32)
    if steps <= start:  # nothing to run (e.g. --resume of a finished run): make sure the support is written
        _commit(store, state, history, max(start, 0))
    x_final, y_final = np.asarray(state.x), np.asarray(state.y)
    summary.update(_plots(out, store, data, x_final, ipc))
    timed = step_times[1:] if len(step_times) > 1 else step_times
    summary.update({
        "status": "ok", "steps_done": int(max(last_good, start)), "final_loss": float(losses[-1]) if losses else None,
        "seconds_per_step": float(np.median(timed)) if timed else None,
        "first_step_seconds": float(step_times[0]) if step_times else None,
        "comm_seconds_per_step": float(np.median(comm_times[1:] or comm_times)) if comm_times else None,
        "val_accuracy": float(history["val_accuracy"][-1]) if len(history["val_accuracy"]) else None,
        "val_accuracy_init": float(history["val_accuracy"][0]) if len(history["val_step"]) and history["val_step"][0] == 0 else None,
        "history": {"val_step": history["val_step"].tolist(), "val_accuracy": [round(float(v), 5) for v in history["val_accuracy"]]},
        "train_seconds": round(time.perf_counter() - t_start, 3),
    })
    if sampler is not None and sampler.rows_read:  # targets read from the store (not held in memory)
        summary["target_bytes_read_per_row"] = round(sampler.bytes_read / sampler.rows_read, 1)
    return summary


def _commit(store: DistilledStore, state: kipmod.KipState, history: dict[str, np.ndarray], step: int) -> None:
    """Checkpoint + top-level support, refusing a non-finite state (the previous checkpoint stays)."""
    leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(state)]
    if not all(np.isfinite(v).all() for v in leaves if np.issubdtype(v.dtype, np.floating)):
        raise NotConvergedError(f"KIP state became non-finite by step {step}; the last good checkpoint "
                                f"(step {store.attrs.get('checkpoint')}) is kept in {store.path}. Lower --lr.")
    try:
        store.write_checkpoint(step, leaves, history)
        store.write_support(np.asarray(state.x), np.asarray(state.y), history, step)
    except OSError as exc:
        if storage.is_disk_full(exc):
            raise storage.disk_full_error(store.path, f"writing the checkpoint of step {step} (the committed "
                                          f"checkpoint, step {store.attrs.get('checkpoint')}, is kept: rerun with "
                                          "--resume)") from None
        raise


def plot_paths(out: str) -> dict[str, str]:
    """Where distill writes its images and curves: ``<out>_images.png`` and ``<out>_curves.png``."""
    base = os.path.splitext(os.path.abspath(out))[0]
    return {"images_png": base + "_images.png", "curves_png": base + "_curves.png"}


def check_plot_paths(out: str, resume: bool, overwrite: bool) -> None:
    """Refuse to replace a file distill did not write: the PNGs next to --out must be new, this store's own
    (recorded in its ``plots`` attribute, on --resume), or replaced with --overwrite."""
    if storage.is_url(out):
        return
    for path in plot_paths(out).values():
        if os.path.islink(path):
            raise InputError(f"{path} is a symbolic link; distill writes its figures only as plain files (never "
                             "through a link): remove the link or choose another --out")
    if overwrite:
        return
    own: list[str] = []
    if resume and storage.exists(out):
        own = list(open_distilled(out).attrs.get("plots") or [])
    for path in plot_paths(out).values():
        if os.path.lexists(path) and path not in own:
            raise InputError(f"{path} already exists and was not written by this distillation; pass --overwrite to "
                             "replace it, or choose another --out")


def _floor_and_ceiling(data: DatasetStore, gram: Any, rows: np.ndarray, reg: float, kern: kipmod.PairKernel,
                       evaluator: Evaluator | None) -> dict[str, Any]:
    """Label-solve floor (initial support rows, labels solved from the stored Gram) and, for small DATA,
    the full-data kernel regression ceiling, both on the validation store when given."""
    t0 = time.perf_counter()
    solved = label_solve(data, gram, rows, reg)
    train_acc = float(np.mean(np.argmax(solved["train_pred"], 1) == data.labels))
    floor: dict[str, Any] = {"train_accuracy": train_acc}
    if evaluator is not None:
        floor["val_accuracy"] = evaluator(kern, data.take(rows), solved["labels"], reg)["accuracy"]
    floor["seconds"] = round(time.perf_counter() - t0, 3)
    out: dict[str, Any] = {"label_solve_floor": floor}
    if data.n <= CEILING_MAX_ROWS and evaluator is not None:
        t0 = time.perf_counter()
        x_all = data.rows(0, data.n)
        ceiling = evaluator(kern, x_all, data.one_hot(), reg)
        out["full_krr_ceiling"] = {"val_accuracy": ceiling["accuracy"], "seconds": round(time.perf_counter() - t0, 3)}
    else:
        out["full_krr_ceiling"] = None
        out["full_krr_ceiling_note"] = (f"DATA has {data.n} rows (> {CEILING_MAX_ROWS}) or no --val: use "
                                        "`kernelscale solve` for the full-data reference")
    return out
