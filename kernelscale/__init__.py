"""kernelscale: infinite-width (NTK/NNGP) kernels at a scale no single machine holds.

Public API (thin; the implementation lives in one module per concept):

- :func:`ingest`, :func:`open_dataset` — dataset stores (``kernelscale.data``)
- :func:`parse_arch`, :class:`KernelSpec` — kernel specifications (``kernelscale.kernels``)
- :func:`compute_gram`, :func:`open_gram` — the Gram engine and Gram stores
- solvers, KIP and robustness tools in their modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from kernelscale.runtime import configure_xla as _configure_xla
from kernelscale.runtime import install_nt_stub as _install_nt_stub

__version__ = "0.1.0"

_configure_xla()  # XLA CPU flags, before JAX creates its backend (see kernelscale.runtime.XLA_CPU_FLAGS)
_install_nt_stub()  # user code may `import neural_tangents.stax` without tensorflow (see runtime.install_nt_stub)

_EXPORTS = {
    "ingest": "kernelscale.data",
    "open_dataset": "kernelscale.data",
    "DatasetStore": "kernelscale.data",
    "Preprocess": "kernelscale.data",
    "parse_arch": "kernelscale.kernels",
    "KernelSpec": "kernelscale.kernels",
    "InputError": "kernelscale.errors",
    "StoreError": "kernelscale.errors",
    "NotConvergedError": "kernelscale.errors",
    "compute_gram": "kernelscale.gram.engine",
    "open_gram": "kernelscale.gram.store",
}


def __getattr__(name: str) -> Any:
    """Lazy exports, so ``import kernelscale`` stays fast and loads JAX/Ray only when used."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernelscale' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
