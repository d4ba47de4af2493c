"""Finite-width validation: empirical NTK of finite networks vs the analytic NTK as width grows.

Reports the relative Frobenius error of the seed-averaged empirical NTK (expected to fall roughly like
width^-1/2) and the relative drift of the empirical NTK during full-batch gradient descent (lazy regime).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from kernelscale.data import balanced_subset, open_dataset
from kernelscale.errors import InputError
from kernelscale.kernels.finite import width_errors
from kernelscale.kernels import parse_arch


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DATA.zarr", help="dataset store (real inputs)")
    p.add_argument("--arch", default="fc", metavar="SPEC", help="architecture spec, e.g. fc:depth=3")
    p.add_argument("--kernel", default="ntk", choices=["ntk"], help="the empirical kernel compared (NTK)")
    p.add_argument("--widths", default="64,256,1024,4096", help="comma-separated widths")
    p.add_argument("--rows", type=int, default=32, help="class-balanced rows of DATA to compare on")
    p.add_argument("--seeds", type=int, default=2, help="random initialisations averaged per width")
    p.add_argument("--drift-steps", type=int, default=100, help="gradient-descent steps for the drift (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="write a log-log plot of error and drift vs width")
    p.add_argument("--allow-code", action="store_true", help="allow --arch module.path:function")


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise InputError(f"--widths must be comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise InputError(f"--widths must be positive integers, got {text!r}")
    return sorted(set(widths))


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = parse_arch(args.arch, args.kernel, allow_code=args.allow_code)
    widths = _widths(args.widths)
    if args.rows < 2 or args.seeds < 1:
        raise InputError("--rows must be >= 2 and --seeds >= 1")
    ds = open_dataset(args.data)
    idx = balanced_subset(ds.labels, args.rows, args.seed)
    report = width_errors(spec, ds.take(idx), ds.one_hot(idx), widths, seeds=args.seeds,
                          drift_steps=args.drift_steps, seed=args.seed)
    summary = {"arch": spec.to_json(), "data": ds.fingerprint} | report.to_json()
    if args.plot:
        plot_width_report(report, args.plot, title=spec.describe())
        summary["plot"] = os.path.abspath(args.plot)
    return summary


def plot_width_report(report: Any, path: str, title: str = "") -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    w = np.asarray(report.widths, float)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog(w, report.errors, "o-", label=f"empirical vs analytic NTK (slope {report.slope:.2f})")
    if any(report.drift):
        ax.loglog(w, report.drift, "s--", label=f"NTK drift during GD (slope {report.drift_slope:.2f})")
    ax.loglog(w, report.errors[0] * (w / w[0]) ** -0.5, ":", color="gray", label="width^-1/2")
    ax.set_xlabel("width")
    ax.set_ylabel("relative Frobenius error")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
