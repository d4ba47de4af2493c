"""Linear algebra over kernel matrices: operators (memory, Zarr, Ray), block PCG, preconditioners, Cholesky.

Knows nothing about neural networks: it sees matrices, Gram stores and right-hand sides.
"""

from .cg import CGOptions, CGState, Solution, cg
from .cholesky import cholesky_solve
from .operators import DenseOperator, LinearOperator, RayGramOperator, ShiftedOperator, ZarrGramOperator
from .preconditioners import (
    JacobiPreconditioner,
    NystromPreconditioner,
    Preconditioner,
    PreconditionerSpec,
    build_preconditioner,
    nystrom_uniform,
    rpcholesky,
)

__all__ = [
    "CGOptions", "CGState", "Solution", "cg", "cholesky_solve", "DenseOperator", "LinearOperator",
    "RayGramOperator", "ShiftedOperator", "ZarrGramOperator", "JacobiPreconditioner", "NystromPreconditioner",
    "Preconditioner", "PreconditionerSpec", "build_preconditioner", "nystrom_uniform", "rpcholesky",
]
