"""The ridge added to a kernel matrix's diagonal, in one place for KRR, KIP and its baselines.

``reg * trace(K) / n`` (neural-tangents' scaling, ``scale="trace"``: reg is relative to the mean diagonal, so one
value suits kernels of any magnitude) or ``reg`` itself (``scale="absolute"``). Plain arithmetic: works on Python
floats, NumPy and traced JAX scalars alike.
"""

from __future__ import annotations

from typing import Any

RIDGE_SCALES = ("trace", "absolute")


def ridge(reg: Any, trace: Any, n: int, scale: str = "trace") -> Any:
    """The value added to the diagonal of an (n, n) kernel matrix with trace ``trace``."""
    return reg * trace / max(n, 1) if scale == "trace" else reg
