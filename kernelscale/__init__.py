"""kernelscale: infinite-width (NTK/NNGP) kernels at a scale no single machine holds.

Public API (each name is loaded on first use, so ``import kernelscale`` stays fast and loads JAX/Ray only
when used; the implementation lives in one module per concept):

Datasets (``kernelscale.data``)
- ``ingest``: images/arrays -> a dataset store (resumable); ``open_dataset``: open one (``DatasetStore``);
  ``Preprocess``: the recorded preprocessing.

Kernels (``kernelscale.kernels``)
- ``parse_arch``: ``"fc:depth=3"`` -> a ``KernelSpec``; ``KernelSource``: what the Gram engine computes from
  (a ``KernelSpec`` or a ``CallableKernel`` wrapping a user ``kernel_fn(x1, x2, get)``).

Gram matrices (``kernelscale.gram``)
- ``compute_gram``: compute or resume a Gram store with Ray actors; ``open_gram``: open one (``GramStore``);
  ``gram_status``: tiles done, rate, ETA; ``verify_gram``: check (and repair) every tile.

Kernel ridge regression (``kernelscale.krr``, ``kernelscale.linalg``)
- ``solve``: fit a KRR model on a Gram store (block PCG); ``evaluate``: score a model on a test set;
  ``open_model``: read a model; ``cg``: the block preconditioned conjugate gradient on any operator.

Dataset distillation (``kernelscale.kip``)
- ``distill``: KIP on a dataset store; ``evaluate_support``: score a distilled support set;
  ``open_distilled``: open a distilled store; ``make_kip``: the pure KIP step (``init``/``update``).

Errors (``kernelscale.errors``)
- ``KernelscaleError`` (base), ``InputError`` (bad input, exit code 2), ``StoreError`` (bad or mismatched
  store), ``NotConvergedError`` (a solver stopped before its tolerance).

Process-wide settings made on import: kernelscale's XLA CPU flags (:func:`kernelscale.runtime.configure_xla`,
opt out with ``KERNELSCALE_XLA_DEFAULTS=0``) and the neural-tangents stub that keeps tensorflow out
(:func:`kernelscale.runtime.install_nt_stub`); see docs/architecture.md, "Process-wide settings".
"""

from __future__ import annotations

import importlib
from typing import Any

from kernelscale.runtime import configure_xla as _configure_xla
from kernelscale.runtime import install_nt_stub as _install_nt_stub

__version__ = "0.1.0"

_configure_xla()  # XLA CPU flags, before JAX creates its backend (see kernelscale.runtime.XLA_CPU_FLAGS)
_install_nt_stub()  # user code may `import neural_tangents.stax` without tensorflow (see runtime.install_nt_stub)

#: Public name -> (module, attribute in that module).
_EXPORTS: dict[str, tuple[str, str]] = {
    "ingest": ("kernelscale.data", "ingest"),
    "open_dataset": ("kernelscale.data", "open_dataset"),
    "DatasetStore": ("kernelscale.data", "DatasetStore"),
    "Preprocess": ("kernelscale.data", "Preprocess"),
    "parse_arch": ("kernelscale.kernels", "parse_arch"),
    "KernelSpec": ("kernelscale.kernels", "KernelSpec"),
    "KernelSource": ("kernelscale.kernels", "KernelSource"),
    "CallableKernel": ("kernelscale.kernels", "CallableKernel"),
    "compute_gram": ("kernelscale.gram.engine", "compute_gram"),
    "gram_status": ("kernelscale.gram.engine", "gram_status"),
    "verify_gram": ("kernelscale.gram.engine", "verify_gram"),
    "open_gram": ("kernelscale.gram.store", "open_gram"),
    "GramStore": ("kernelscale.gram.store", "GramStore"),
    "solve": ("kernelscale.krr", "solve"),
    "evaluate": ("kernelscale.krr", "evaluate"),
    "open_model": ("kernelscale.krr", "open_model"),
    "cg": ("kernelscale.linalg.cg", "cg"),
    "distill": ("kernelscale.kip.run", "distill"),
    "evaluate_support": ("kernelscale.kip.run", "evaluate"),
    "open_distilled": ("kernelscale.kip.store", "open_distilled"),
    "make_kip": ("kernelscale.kip.step", "make_kip"),
    "KernelscaleError": ("kernelscale.errors", "KernelscaleError"),
    "InputError": ("kernelscale.errors", "InputError"),
    "StoreError": ("kernelscale.errors", "StoreError"),
    "NotConvergedError": ("kernelscale.errors", "NotConvergedError"),
}


def __getattr__(name: str) -> Any:
    """Lazy exports, so ``import kernelscale`` stays fast and loads JAX/Ray only when used."""
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'kernelscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
