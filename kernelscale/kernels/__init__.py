"""Kernel specifications and kernel functions.

A kernel is named by a :class:`KernelSpec` (architecture name, parameters, ``ntk``/``nngp``), written on the
command line as ``--arch NAME[:key=value,...] --kernel ntk|nngp`` and canonicalised to JSON, which enters
every fingerprint. Any ``kernel_fn(x1, x2, get)`` callable (e.g. from a user's ``stax.serial``) works too.

Modules: ``spec`` (KernelSpec, ``--arch`` parsing, canonical JSON, ``load_spec``, user code), ``stax_networks``
(neural-tangents networks and ``fast_relu``; the only module importing neural-tangents), ``blocks`` (``kernel_fn``,
``pairwise``, the Gram engine's calls, export/load of block kernels, bytes per pair), ``source`` (the
``KernelSource`` protocol the Gram engine computes from), ``native`` (kernelscale's own exact recursions),
``finite`` (finite-width checks). This package re-exports the names other packages use.
"""

from __future__ import annotations

from kernelscale.kernels.blocks import (bytes_per_pair, export_block_kernel, fixed_bytes, gram_calls, kernel_fn,
                                        load_block_kernel, pairwise, spatial_pairs)
from kernelscale.kernels.source import CallableKernel, KernelSource, traced_bytes_per_pair
from kernelscale.kernels.spec import (ACTIVATIONS, ARCH_DEFAULTS, KERNELS, MAX_DEPTH, MYRTLE_LAYERS, KernelFn,
                                      KernelSpec, check_input_shape, code_allowed, load_spec, parse_arch)
from kernelscale.kernels.stax_networks import (KERNEL_IMPL_VERSION, _fast_atan2, _neural_tangents,  # noqa: F401
                                               empirical_ntk_fn, fast_relu, network, nt_batch, versions)

__all__ = [
    "ACTIVATIONS", "ARCH_DEFAULTS", "KERNELS", "KERNEL_IMPL_VERSION", "MAX_DEPTH", "MYRTLE_LAYERS", "CallableKernel",
    "KernelFn", "KernelSource", "KernelSpec", "bytes_per_pair", "check_input_shape", "code_allowed",
    "empirical_ntk_fn", "export_block_kernel", "fast_relu", "fixed_bytes", "gram_calls", "kernel_fn",
    "load_block_kernel", "load_spec", "network", "nt_batch", "pairwise", "parse_arch", "spatial_pairs",
    "traced_bytes_per_pair", "versions",
]
