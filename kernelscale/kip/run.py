"""A whole KIP run (``kernelscale distill``) and kernel regression from a support set (``kernelscale evaluate``).

``distill`` takes a :class:`KipConfig` (or its fields as keywords) and runs four steps, each usable alone:
:func:`check_distill` checks every input before any compute, :func:`init_or_resume` initialises (or resumes) the
support, :func:`run_steps` runs the steps (in-process for one worker, sharded over Ray actors otherwise),
evaluates on a validation store every E steps and commits checkpoints every C steps, and :func:`finish_distill`
writes an image grid and loss/accuracy curves and returns the :class:`DistillResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from kernelscale.kip import step as kipmod
from kernelscale import storage
from kernelscale.config import JsonResult, at_least, non_negative, one_of, option, positive, resume_keys
from kernelscale.config import build as config_build
from kernelscale.config import validate as config_validate
from kernelscale.data import DatasetStore, open_dataset
from kernelscale.gram.store import open_gram
from kernelscale.kip.adversarial import AdversarialTargets
from kernelscale.kip.store import DistilledStore, create_distilled, empty_history, open_distilled
from kernelscale.errors import InputError, NotConvergedError, StoreError
from kernelscale.kernels import KernelSpec, check_input_shape, load_spec, parse_arch
from kernelscale.kip.targets import (DEFAULT_MEMORY_LIMIT, SAMPLING_MODES, TargetSampler, check_gram, check_ipc, init_gram,
                       init_random, label_solve, sampling_mode)
from kernelscale.kip.sharding import LocalPool, RayPool, ShardWorker, pair_kernel, sharded_sums, tiled_sums
from kernelscale.kip.augment import TargetAugment
from kernelscale.runtime import ensure_ray, shutdown_if_started

log = logging.getLogger(__name__)

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


def _plots(out: str, store: DistilledStore, data: DatasetStore, x: np.ndarray, ipc: int) -> dict[str, str]:
    """Write ``<out>_images.png`` (support rows per class, un-preprocessed) and ``<out>_curves.png``."""
    if storage.is_url(out):
        return {}
    import matplotlib  # noqa: PLC0415  (defers matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (defers matplotlib)

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


# ----------------------------------------------------------------------------------------------------------
# distill: config, result, and the steps validate -> init or resume -> loop -> finish
# ----------------------------------------------------------------------------------------------------------


def _sampling_check(value: Any) -> str | None:
    return None if value in SAMPLING_MODES else f"must be {', '.join(SAMPLING_MODES)}, got {value!r}"


@dataclass(frozen=True, kw_only=True)
class KipConfig:
    """Settings of one KIP run (``kernelscale distill --help`` says what each one does). Fields marked
    ``resume=True`` must be unchanged for ``--resume`` (with the kernel spec and the dataset fingerprint)."""

    data: str = option("data", metavar="DATA.zarr", help="dataset store (from `kernelscale ingest`)")
    arch: str = option("--arch", "fc", metavar="SPEC", help="architecture, e.g. fc:depth=3 (default fc)")
    kernel: str = option("--kernel", "ntk", choices=("ntk", "nngp"))
    ipc: int = option("--ipc", 10, type=int, metavar="K", help="support images per class (default 10)",
                      resume=True, check=at_least(1))
    steps: int = option("--steps", 6000, type=int, metavar="S", help="total KIP steps (default 6000)",
                        check=at_least(0))
    target_batch: int = option("--target-batch", 2000, type=int, metavar="B",
                               help="target rows per step (default 2000)", resume=True, check=at_least(1))
    lr: float = option("--lr", 0.01, type=float, metavar="LR", help="Adam learning rate (default 0.01)",
                       resume=True, check=positive())
    label_lr: float | None = option("--label-lr", None, type=float, metavar="LR",
                                    help="Adam learning rate of the labels (default: --lr)", resume=True,
                                    check=positive(optional=True))
    schedule: str = option("--schedule", "cosine", choices=("cosine", "linear", "constant"),
                           help="learning-rate schedule over --steps: cosine/linear decay to 0, or constant "
                                "(default cosine)", resume=True, check=one_of(kipmod.SCHEDULES))
    learn_labels: bool = option("--learn-labels", False, action="store_true", help="also learn the support labels",
                                resume=True)
    reg: float = option("--reg", 1e-6, type=float, metavar="R", help="ridge, times trace(K_ss)/n_s (default 1e-6)",
                        resume=True, check=non_negative())
    workers: int = option("--workers", 1, type=int, metavar="W", help="Ray actors sharing each target batch",
                          check=at_least(1))
    seed: int = option("--seed", 0, type=int, metavar="SEED", resume=True)
    init: str = option("--init", "random", choices=("random", "gram"),
                       help="random: class-balanced real rows; gram: randomized pivoted Cholesky over --gram",
                       resume=True, check=lambda v: None if v in ("random", "gram") else
                       f"must be random or gram, got {v!r}")
    gram: str | None = option("--gram", None, metavar="GRAM.zarr",
                              help="stored Gram of DATA (for --init gram and the label-solve floor)")
    val: str | None = option("--val", None, metavar="VAL.zarr",
                             help="validation store for accuracy every --eval-every steps")
    eval_every: int = option("--eval-every", 500, type=int, metavar="E", check=at_least(1))
    checkpoint_every: int = option("--checkpoint-every", 500, type=int, metavar="C", check=at_least(1))
    resume: bool = option("--resume", False, action="store_true", help="continue --out from its last checkpoint")
    kss_tile: int | None = option("--kss-tile", None, type=int, metavar="T",
                                  help="compute K_ss in T x T tiles across the workers (large supports, e.g. 10,000 "
                                       "images)", check=at_least(1, optional=True))
    target_augment: str = option("--target-augment", "auto", metavar="SPEC", resume=True,
                                 help="translate/flip target images: auto (up to 1/16 of the image side: 2 px at "
                                      "32x32; none for non-image rows), none, or a comma list of shift=K and flip, "
                                      "e.g. shift=2,flip (flip only for mirror-symmetric classes)")
    target_sampling: str = option("--target-sampling", "auto", choices=SAMPLING_MODES, resume=True,
                                  check=_sampling_check,
                                  help="rows: random rows of every class (a dataset larger than memory is read row "
                                       "by row, a whole store chunk per row); chunks: rows from a few whole chunks "
                                       "per step, so a step reads at most twice the bytes it uses (classes "
                                       "balanced as far as those chunks allow; store rows that mix classes give "
                                       "balanced batches); auto: chunks when DATA does not fit in memory (4 GiB), "
                                       "else rows. --resume keeps the run's choice")
    out: str = option("--out", metavar="DISTILLED.zarr")
    overwrite: bool = option("--overwrite", False, action="store_true",
                             help="replace existing files at <out>_images.png / <out>_curves.png that this run did "
                                  "not write")
    adversarial: str | None = option("--adversarial", None, metavar="linf:EPS|l2:EPS", resume=True,
                                     help="adversarial KIP: replace target batches by PGD examples (pixel-space "
                                          "ball) against the support")
    pgd_steps: int = option("--pgd-steps", 10, type=int, metavar="P", help="PGD steps per KIP step (default 10)")
    adv_mix: float = option("--adv-mix", 1.0, type=float, metavar="F",
                            help="fraction of target rows replaced by adversarial ones (default 1: all)")
    progress: bool = option(None, True)  # progress bars (the CLI's --no-progress)
    memory_limit: int = option(None, DEFAULT_MEMORY_LIMIT)  # bytes of DATA a sampler holds in RAM


#: Settings that must match for --resume to continue a run (steps may grow).
RESUME_KEYS = ("spec", *resume_keys(KipConfig), "dataset_fingerprint")
#: What a store written before a resume key existed was made with (so older runs still resume).
RESUME_DEFAULTS = {"target_augment": "none", "target_sampling": "rows"}


@dataclass(frozen=True, eq=False)
class DistillResult(JsonResult):
    """One KIP run: its settings as run (label_lr resolved, target_augment/target_sampling described), the
    reference accuracies from a stored Gram (``reference``: label_solve_floor, full_krr_ceiling), the figures
    written (``plots``: images_png, curves_png) and the outcome (steps done, losses, timings, val accuracy)."""

    out: str
    kernel: str
    n_support: int
    ipc: int
    steps: int
    start_step: int
    target_batch: int
    lr: float
    label_lr: float
    schedule: str
    reg: float
    kss_tile: int | None
    learn_labels: bool
    workers: int
    init: str
    target_augment: str
    target_sampling: str
    adversarial: str | None = None
    reference: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    status: str = "ok"
    steps_done: int = 0
    final_loss: float | None = None
    seconds_per_step: float | None = None
    first_step_seconds: float | None = None
    comm_seconds_per_step: float | None = None
    val_accuracy: float | None = None
    val_accuracy_init: float | None = None
    history: dict[str, list[Any]] = field(default_factory=dict)
    train_seconds: float = 0.0
    target_bytes_read_per_row: float | None = None

    SETTINGS = ("out", "kernel", "n_support", "ipc", "steps", "start_step", "target_batch", "lr", "label_lr",
                "schedule", "reg", "kss_tile", "learn_labels", "workers", "init", "target_augment", "target_sampling")
    OUTCOME = ("status", "steps_done", "final_loss", "seconds_per_step", "first_step_seconds",
               "comm_seconds_per_step", "val_accuracy", "val_accuracy_init", "history", "train_seconds")

    def settings_json(self) -> dict[str, Any]:
        """The keys known before the first step (what a run that fails reports with its failure)."""
        summary = {k: getattr(self, k) for k in self.SETTINGS}
        if self.adversarial is not None:
            summary["adversarial"] = self.adversarial
        return summary | self.reference

    def to_json(self) -> dict[str, Any]:
        summary = self.settings_json() | self.plots | {k: getattr(self, k) for k in self.OUTCOME}
        if self.target_bytes_read_per_row is not None:
            summary["target_bytes_read_per_row"] = self.target_bytes_read_per_row
        return summary


def distill(data_path: str | None = None, config: KipConfig | None = None, *,
            target_transform: kipmod.TargetTransform | None = None, **overrides: Any) -> DistillResult:
    """Run KIP on DATA (see ``kernelscale distill --help``); returns the :class:`DistillResult`.

    Settings: a :class:`KipConfig`, or its fields as keyword arguments (``out`` is required), or both (keywords
    win). ``target_transform`` replaces each target batch (the adversarial-KIP hook, see
    :mod:`kernelscale.kip.adversarial`). Raises :class:`NotConvergedError` (exit 3) when the loss becomes
    non-finite: the last good checkpoint stays.
    """
    t_start = time.perf_counter()
    given = {"data": data_path} if data_path is not None else {}
    cfg = config_build(KipConfig, config, given | overrides)
    plan = check_distill(cfg, target_transform)
    run = init_or_resume(cfg, plan)
    loop = run_steps(cfg, plan, run)
    return finish_distill(cfg, plan, run, loop, t_start)


@dataclass(eq=False)
class DistillPlan:
    """What :func:`check_distill` opened and derived before any compute: the stores, the kernel spec, the
    target augmentation and transform, and ``run_config``, the settings recorded in the store (resume keys)."""

    data: DatasetStore
    spec: KernelSpec
    augment: TargetAugment
    data_like: dict[str, Any]
    val_store: DatasetStore | None
    gram_store: Any
    label_lr: float
    adversarial: Any
    target_transform: kipmod.TargetTransform | None
    run_config: dict[str, Any]


def check_distill(cfg: KipConfig, target_transform: kipmod.TargetTransform | None = None) -> DistillPlan:
    """Validate ``cfg`` and every store it names (and, with ``resume``, that ``out`` was made with the same
    settings), before any compute."""
    config_validate(cfg)
    if cfg.init == "gram" and not cfg.gram:
        raise InputError("--init gram needs --gram GRAM.zarr (the stored Gram of DATA)")
    data = open_dataset(cfg.data)
    spec = parse_arch(cfg.arch, cfg.kernel)
    check_input_shape(spec, data.input_shape)
    check_ipc(data, cfg.ipc)
    augment = TargetAugment.parse(cfg.target_augment, data.input_shape)
    data.check_rows()  # NaN/Inf rows or corrupt chunks are refused before any compute
    data.check_content()  # and rows/labels edited behind the fingerprint's back (sampled chunks)
    if data.num_classes < 2:
        raise InputError(f"{cfg.data}: KIP needs at least 2 classes, found {data.num_classes}")
    data_like = {"input_shape": list(data.input_shape), "preprocess_digest": data.affine.digest(),
                 "num_classes": data.num_classes}
    val_store = open_dataset(cfg.val) if cfg.val else None
    if val_store is not None:
        check_compatible(data_like, val_store, "--val")
    gram_store = None
    if cfg.gram:
        gram_store = open_gram(cfg.gram)
        check_gram(gram_store, data, spec.canonical())
    label_lr = cfg.lr if cfg.label_lr is None else cfg.label_lr
    adv = None  # adversarial KIP (kernelscale.kip.adversarial): PGD target batches against the support
    if cfg.adversarial:
        if target_transform is not None:
            raise InputError("pass either adversarial= or target_transform=, not both")
        adv = target_transform = AdversarialTargets.build(cfg.adversarial, cfg.pgd_steps, cfg.adv_mix, spec, cfg.reg,
                                                          data.affine)
    run_config = {"spec": spec.to_json(), "reg": cfg.reg, "lr": cfg.lr, "label_lr": label_lr,
                  "schedule": cfg.schedule, "schedule_steps": max(cfg.steps, 1), "learn_labels": bool(cfg.learn_labels),
                  "ipc": cfg.ipc, "target_batch": cfg.target_batch, "seed": cfg.seed, "init": cfg.init,
                  "dataset_fingerprint": data.fingerprint, "target_augment": augment.describe()}
    run_config["adversarial"] = adv.config() if adv is not None else None
    target_sampling = cfg.target_sampling
    if target_sampling == "auto" and cfg.resume and storage.exists(cfg.out):  # auto continues as the run began
        begun = open_distilled(cfg.out).attrs.get("config", {})
        target_sampling = begun.get("target_sampling", RESUME_DEFAULTS["target_sampling"])
    run_config["target_sampling"] = sampling_mode(target_sampling, data, cfg.memory_limit)
    storage.check_disjoint(cfg.out, [("DATA", cfg.data), ("--val", cfg.val), ("--gram", cfg.gram)], "--out")
    exists = storage.exists(cfg.out)
    if exists and not cfg.resume:
        raise InputError(f"{cfg.out} already exists; pass --resume to continue it, or choose another --out")
    check_plot_paths(cfg.out, cfg.resume, cfg.overwrite)
    if cfg.resume and not exists:
        raise InputError(f"--resume: {cfg.out} does not exist; run without --resume to start")
    if cfg.resume:
        old = open_distilled(cfg.out).attrs.get("config", {})
        diff = [k for k in RESUME_KEYS if old.get(k, RESUME_DEFAULTS.get(k)) != run_config[k]]
        if diff:
            raise InputError(f"--resume: {cfg.out} was made with other settings ({', '.join(diff)} differ); "
                             "use the same flags or another --out")
        # The learning-rate schedule spans this invocation's --steps: resuming with the same --steps (after a
        # kill) reproduces the uninterrupted run exactly; a larger --steps stretches the schedule to the new end.
    return DistillPlan(data, spec, augment, data_like, val_store, gram_store, label_lr, adv, target_transform,
                       run_config)


@dataclass(eq=False)
class DistillRun:
    """The run as it starts: the store, the support rows (n_s,), the KIP optimiser and its state (resumed from
    the store's checkpoint at ``start``), the history so far, the validation evaluator and the result's settings."""

    store: DistilledStore
    rows: np.ndarray
    kern: kipmod.PairKernel
    kip: kipmod.Kip
    state: kipmod.KipState
    history: dict[str, np.ndarray]
    start: int
    evaluator: Evaluator | None
    result: DistillResult


def init_or_resume(cfg: KipConfig, plan: DistillPlan) -> DistillRun:
    """Open ``out`` and its last checkpoint (``resume``) or create it with the initial support; then the label
    -solve floor and full-data ceiling when a stored Gram is given, and the step-0 validation accuracy."""
    data, spec = plan.data, plan.spec
    store: DistilledStore | None = open_distilled(cfg.out, "r+") if cfg.resume else None
    kern = pair_kernel(spec)
    if store is not None:
        rows = np.asarray(store.group["support_rows"][...], np.int64)
    elif cfg.init == "gram":
        assert plan.gram_store is not None
        rows = init_gram(data, plan.gram_store, cfg.ipc, cfg.seed)
    else:
        rows = init_random(data, cfg.ipc, cfg.seed)
    kip = kipmod.make_kip(kern, lr=cfg.lr, reg=cfg.reg, learn_labels=cfg.learn_labels, label_lr=plan.label_lr,
                          schedule=cfg.schedule, total_steps=plan.run_config["schedule_steps"],
                          target_transform=plan.target_transform)
    state = kip.init(data.take(rows), data.one_hot(rows), cfg.seed)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    history = empty_history()
    start = 0
    if store is not None:
        found = store.latest_checkpoint([np.asarray(v) for v in leaves])
        if found is not None:
            start, saved, history = found
            state = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in saved])
            log.info("resuming %s from its checkpoint at step %d", cfg.out, start)
    else:
        store = create_distilled(
            cfg.out, n_support=len(rows), input_shape=data.input_shape, num_classes=data.num_classes,
            support_rows=rows,
            attrs={"arch": spec.arch, "kernel": spec.kernel, "spec": spec.to_json(), "reg": cfg.reg,
                   "dataset_fingerprint": data.fingerprint, "dataset": cfg.data, "class_names": data.class_names,
                   "config": plan.run_config, **plan.data_like})
    evaluator = Evaluator(plan.val_store, memory_limit=cfg.memory_limit) if plan.val_store is not None else None
    reference = (_floor_and_ceiling(data, plan.gram_store, rows, cfg.reg, kern, evaluator)
                 if plan.gram_store is not None else {})
    result = DistillResult(
        out=cfg.out, kernel=spec.describe(), n_support=int(len(rows)), ipc=cfg.ipc, steps=cfg.steps,
        start_step=start, target_batch=cfg.target_batch, lr=cfg.lr, label_lr=plan.label_lr, schedule=cfg.schedule,
        reg=cfg.reg, kss_tile=cfg.kss_tile, learn_labels=bool(cfg.learn_labels), workers=cfg.workers,
        init=cfg.init, target_augment=plan.augment.describe(), target_sampling=plan.run_config["target_sampling"],
        adversarial=plan.adversarial.describe() if plan.adversarial is not None else None, reference=reference)
    run = DistillRun(store, rows, kern, kip, state, history, start, evaluator, result)
    if start == 0 and evaluator is not None and len(history["val_step"]) == 0:
        _val_accuracy(cfg, run, 0)
    return run


def _val_accuracy(cfg: KipConfig, run: DistillRun, step: int) -> None:
    """Append the validation accuracy of the current support at ``step`` to the run's history."""
    if run.evaluator is None:
        return
    res = run.evaluator(run.kern, run.state.x, run.state.y, cfg.reg)
    run.history["val_step"] = np.append(run.history["val_step"], step).astype(np.int64)
    run.history["val_accuracy"] = np.append(run.history["val_accuracy"], res["accuracy"]).astype(np.float32)
    log.info("step %d: val accuracy %.4f", step, res["accuracy"])


@dataclass
class LoopStats:
    """What :func:`run_steps` measured: per-step losses (all steps so far), seconds, communication seconds, the
    last committed step, and the target sampler (None when shards sample)."""

    losses: list[float]
    step_times: list[float] = field(default_factory=list)
    comm_times: list[float] = field(default_factory=list)
    last_good: int = 0
    sampler: TargetSampler | None = None


def run_steps(cfg: KipConfig, plan: DistillPlan, run: DistillRun) -> LoopStats:
    """Steps ``run.start .. cfg.steps`` (in-process for one worker, sharded over a pool otherwise), with the
    validation accuracy every ``eval_every`` steps and a checkpoint every ``checkpoint_every`` steps (and on
    Ctrl-C/SIGTERM). A non-finite loss raises :class:`NotConvergedError`; ``run.state`` is the last good state."""
    data, spec, start, steps = plan.data, plan.spec, run.start, cfg.steps
    sampling = plan.run_config["target_sampling"]
    pool: LocalPool | RayPool | None = None
    stats = LoopStats(losses=list(run.history["loss"]), last_good=start)
    ray_info: dict[str, Any] = {}
    if cfg.workers == 1 and cfg.kss_tile is None:
        stats.sampler = TargetSampler(data, cfg.target_batch, cfg.seed, cfg.memory_limit, plan.augment, sampling)
    else:
        worker_kwargs = dict(lr=cfg.lr, reg=cfg.reg, learn_labels=cfg.learn_labels, batch=cfg.target_batch,
                             seed=cfg.seed, parts=cfg.workers, memory_limit=cfg.memory_limit,
                             target_transform=plan.target_transform, augment=plan.augment, sampling=sampling)
        if cfg.workers == 1:
            pool = LocalPool([ShardWorker(cfg.data, spec.canonical(), part=0, **worker_kwargs)])
        else:
            ray_info = ensure_ray()
            path = os.path.abspath(cfg.data) if not storage.is_url(cfg.data) else cfg.data
            pool = RayPool(lambda w: ((path, spec.canonical()), dict(worker_kwargs, part=w)), cfg.workers)
    losses, history, store = stats.losses, run.history, run.store
    bar = tqdm(total=max(0, steps - start), desc="kip", unit="step", disable=not cfg.progress)
    batches = stats.sampler.iterate(start, steps) if stats.sampler is not None else None
    completed = start  # steps whose update is in ``run.state``
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            if batches is not None:
                x_t, y_t = next(batches)
                new_state, metrics = run.kip.update(run.state, (x_t, y_t))
            else:
                assert pool is not None
                if cfg.kss_tile is not None:
                    sums, count, timing = tiled_sums(pool, run.state, step, cfg.kss_tile, cfg.reg)
                else:
                    sums, count, timing = sharded_sums(pool, run.state, step)
                    stats.comm_times.append(timing["comm"])
                new_state, metrics = run.kip.apply(run.state, sums, count)
            loss = float(metrics["loss"])
            stats.step_times.append(time.perf_counter() - t0)
            if not math.isfinite(loss):
                raise NotConvergedError(
                    f"KIP loss became non-finite ({loss}) at step {step}; stopped. The last good checkpoint "
                    f"(step {store.attrs.get('checkpoint')}) is kept in {cfg.out}. Lower --lr or raise --reg.",
                    run.result.settings_json() | {"status": "non-finite", "failed_step": step,
                                                  "checkpoint": store.attrs.get("checkpoint")})
            losses.append(loss)
            run.state = new_state
            done = completed = step + 1
            bar.update(1)
            if run.evaluator is not None and (done % cfg.eval_every == 0 or done == steps):
                history["loss"] = np.asarray(losses, np.float32)
                _val_accuracy(cfg, run, done)
            if done % cfg.checkpoint_every == 0 or done == steps:
                history["loss"] = np.asarray(losses, np.float32)
                _commit(store, run.state, history, done)
                stats.last_good = done
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI: keep every finished step for --resume
        if completed > stats.last_good:
            history["loss"] = np.asarray(losses[:completed], np.float32)
            _commit(store, run.state, history, completed)
            log.warning("interrupted: checkpoint written at step %d of %d in %s", completed, steps, cfg.out)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
        if ray_info:
            shutdown_if_started(ray_info)
    history["loss"] = np.asarray(losses, np.float32)
    return stats


def finish_distill(cfg: KipConfig, plan: DistillPlan, run: DistillRun, stats: LoopStats, t_start: float
                   ) -> DistillResult:
    """Write the support (if no step ran), the figures, and return the result with the run's outcome."""
    history, start, losses = run.history, run.start, stats.losses
    if cfg.steps <= start:  # nothing to run (e.g. --resume of a finished run): make sure the support is written
        _commit(run.store, run.state, history, max(start, 0))
    x_final = np.asarray(run.state.x)
    plots = _plots(cfg.out, run.store, plan.data, x_final, cfg.ipc)
    step_times, comm_times = stats.step_times, stats.comm_times
    timed = step_times[1:] if len(step_times) > 1 else step_times
    sampler = stats.sampler
    return dataclasses.replace(
        run.result, plots=plots, status="ok", steps_done=int(max(stats.last_good, start)),
        final_loss=float(losses[-1]) if losses else None,
        seconds_per_step=float(np.median(timed)) if timed else None,
        first_step_seconds=float(step_times[0]) if step_times else None,
        comm_seconds_per_step=float(np.median(comm_times[1:] or comm_times)) if comm_times else None,
        val_accuracy=float(history["val_accuracy"][-1]) if len(history["val_accuracy"]) else None,
        val_accuracy_init=(float(history["val_accuracy"][0])
                           if len(history["val_step"]) and history["val_step"][0] == 0 else None),
        history={"val_step": history["val_step"].tolist(),
                 "val_accuracy": [round(float(v), 5) for v in history["val_accuracy"]]},
        train_seconds=round(time.perf_counter() - t_start, 3),
        # targets read from the store (not held in memory)
        target_bytes_read_per_row=(round(sampler.bytes_read / sampler.rows_read, 1)
                                   if sampler is not None and sampler.rows_read else None))


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
