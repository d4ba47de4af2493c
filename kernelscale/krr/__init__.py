"""Kernel ridge regression on stored Gram matrices: solve, evaluate, learning curves.

One module per concept, importing downwards in this order:

- ``learning_curve``: :func:`curve` on stores, :func:`curve_arrays` on matrices, the one loop :func:`curve_solves`
- ``solver``: :func:`solve` as :func:`check_solve`, :func:`run_solver`, :func:`finish_solve`, and their checks
- ``evaluation``: :func:`evaluate` a model on a cross Gram K(test, train), :func:`scores`
- ``model``: the model store (``MODEL.zarr``) :func:`write_model` writes and :func:`open_model` reads
- ``config`` (:class:`SolveConfig`, :class:`CurveConfig`) and ``results`` (:class:`SolveResult`, :class:`CurveResult`)

Everything public is importable from here (``from kernelscale.krr import solve``).
"""

from __future__ import annotations

from kernelscale.krr.config import OPERATORS, REG_SCALES, SOLVE_FLAG_NAMES, SOLVERS, CurveConfig, SolveConfig
from kernelscale.krr.evaluation import check_cross, evaluate, label_scores, scores
from kernelscale.krr.learning_curve import curve, curve_arrays, curve_solves, nested_order, parse_sizes
from kernelscale.krr.model import MODEL_FORMAT_VERSION, check_model_layout, open_model, write_model
from kernelscale.krr.results import CurveResult, SolveResult
from kernelscale.krr.solver import (
    CheckedSolve,
    check_checkpoint_path,
    check_gram_for_data,
    check_reg,
    check_solve,
    effective_reg,
    finish_solve,
    open_operator,
    run_solver,
    solve,
)

__all__ = [
    "OPERATORS", "REG_SCALES", "SOLVERS", "SOLVE_FLAG_NAMES", "CurveConfig", "SolveConfig",
    "CurveResult", "SolveResult",
    "solve", "CheckedSolve", "check_solve", "run_solver", "finish_solve",
    "check_reg", "effective_reg", "check_gram_for_data", "check_checkpoint_path", "open_operator",
    "MODEL_FORMAT_VERSION", "write_model", "check_model_layout", "open_model",
    "evaluate", "check_cross", "scores", "label_scores",
    "curve", "curve_arrays", "curve_solves", "nested_order", "parse_sizes",
]
