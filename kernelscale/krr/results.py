"""Typed results of ``solve`` (:class:`SolveResult`) and ``curve`` (:class:`CurveResult`).

``to_json()`` is the command's JSON summary (the keys and values ``--json`` prints); the results also read like
that summary (``result["status"]``), see :class:`kernelscale.config.JsonResult`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kernelscale.config import JsonResult
from kernelscale.errors import NotConvergedError


@dataclass(frozen=True, eq=False)
class SolveResult(JsonResult):
    """One kernel ridge solve. ``status`` is the solver's ("converged", "max_iterations", "breakdown", ...);
    rel_residual the largest true relative residual over the class columns; ``out`` the model written (None when
    the solve did not converge: then no model is written). The ``operator`` .. ``seconds_per_iteration`` fields
    are those of an iterative solve (None for Cholesky)."""

    status: str
    iterations: int
    rel_residual: float
    seconds: float
    message: str
    solver: str
    n: int
    classes: int
    reg: float
    reg_scale: str
    reg_effective: float
    precond: str
    operator: str | None = None
    precond_seconds: float | None = None
    products: int | None = None
    operator_seconds: float | None = None
    seconds_per_iteration: float | None = None
    out: str | None = None

    ITERATIVE = ("operator", "precond_seconds", "products", "operator_seconds", "seconds_per_iteration")

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    def to_json(self) -> dict[str, Any]:
        summary = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.operator is None:
            for key in self.ITERATIVE:
                del summary[key]
        return summary

    def raise_for_status(self) -> SolveResult:
        """This result, or :class:`NotConvergedError` (with this summary) when the solve did not converge."""
        if not self.converged:
            raise NotConvergedError(f"solve did not converge: {self.message}", self.to_json())
        return self


@dataclass(frozen=True, eq=False)
class CurveResult(JsonResult):
    """A learning curve: per size (ascending) the test ``accuracy``, ``mse``, solve seconds and solver
    ("cholesky" or "cg"). ``seed`` and ``seconds`` are those of a curve on stores (None on in-memory matrices)."""

    sizes: list[int]
    accuracy: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    solve_seconds: list[float] = field(default_factory=list)
    solver: list[str] = field(default_factory=list)
    reg: float = 0.0
    reg_scale: str = "trace"
    seed: int | None = None
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        summary = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("seed", "seconds"):
            if summary[key] is None:
                del summary[key]
        return summary
