"""Kernel blocks: the ``kernel_fn`` of a spec, jitted ``f(x1, x2)`` block calls, the Gram engine's calls,
export/load of compiled block kernels, and the memory one call needs (bytes per pair, fixed bytes).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from kernelscale.kernels.spec import KernelFn, KernelSpec
from kernelscale.kernels.stax_networks import network

log = logging.getLogger(__name__)


def kernel_fn(spec: KernelSpec, *, fast: bool = True, native: bool = True) -> KernelFn:
    """The analytic ``kernel_fn(x1, x2, get)`` of a spec.

    Built-in architectures (fc with relu/erf, convnet, myrtle) use kernelscale's own exact recursions
    (:mod:`kernelscale.kernels.native`: structured convolutions, exact diagonals, differentiable). ``native=False``
    builds neural-tangents' ``stax`` kernel instead (with :func:`fast_relu`, or with neural-tangents' own
    ``stax.Relu`` when ``fast=False``: the reference the tests and benchmarks compare against).
    """
    from kernelscale.kernels import native as native_kernels  # noqa: PLC0415  (native imports jax)

    if native and native_kernels.supports(spec):
        return native_kernels.kernel_fn(spec)
    return network(spec, fast=fast)[2]


def pairwise(spec_or_fn: KernelSpec | KernelFn, get: str | None = None) -> Callable[[Any, Any], Any]:
    """A jitted ``f(x1, x2) -> (n1, n2)`` kernel block for a spec (its kernel) or a kernel_fn + ``get``."""
    import jax  # noqa: PLC0415

    if isinstance(spec_or_fn, KernelSpec):
        fn, get = kernel_fn(spec_or_fn), spec_or_fn.kernel
    else:
        fn, get = spec_or_fn, get or "ntk"
    return jax.jit(lambda x1, x2: fn(x1, x2, get))


def gram_calls(spec: KernelSpec, dtype: str = "float32") -> tuple[Callable[[Any, Any], Any], Callable[[Any], Any] | None]:
    """The forward Gram engine's kernel calls for a spec: ``(f(x1, x2) -> (n1, n2), g(x) -> (n, n) or None)``.

    ``g`` is the symmetric call for diagonal blocks (each unordered pair once, exact diagonal); None when the
    spec has no native kernel. Convolutional kernels run compiled CPU code (:mod:`kernelscale.kernels.native`) on a
    CPU backend in float32, and the JAX recursion elsewhere (GPU, float64).
    """
    from kernelscale.kernels import native as native_kernels  # noqa: PLC0415  (native imports jax)

    if not native_kernels.supports(spec):
        return pairwise(spec), None
    return native_kernels.gram_block(spec, dtype), native_kernels.gram_symmetric(spec, dtype)


def export_block_kernel(fn: Callable[[Any, Any], Any], rows: int, input_shape: tuple[int, ...], dtype: str
                        ) -> bytes | None:
    """Serialise a jitted block kernel ``fn(x1, x2)`` for ``(rows, *input_shape)`` inputs (``jax.export``).

    The Gram driver traces the kernel once while its actors start, and every actor compiles the serialised
    program instead of re-tracing neural-tangents (~0.4 s per actor for an fc NTK here, more for deep
    convnets). Returns None when the function cannot be exported (an actor then traces it itself).
    """
    import jax  # noqa: PLC0415
    from jax import export  # noqa: PLC0415

    try:
        spec = jax.ShapeDtypeStruct((rows, *input_shape), dtype)
        return bytes(export.export(fn)(spec, spec).serialize())
    except Exception as exc:  # noqa: BLE001 - any failure only costs the actors a local trace
        log.debug("kernel not exportable (%s); actors trace it themselves", exc)
        return None


def load_block_kernel(blob: bytes) -> Callable[[Any, Any], Any]:
    """The jitted ``f(x1, x2)`` of a :func:`export_block_kernel` blob (compiled on its first call)."""
    import jax  # noqa: PLC0415
    from jax import export  # noqa: PLC0415

    return jax.jit(export.deserialize(bytearray(blob)).call)


def spatial_pairs(spec: KernelSpec, input_shape: tuple[int, ...]) -> int:
    """How many spatial covariance entries neural-tangents keeps per pair of inputs.

    fc kernels keep one number per pair; convolutional kernels with pooling keep the full spatial
    covariance, ``(H*W)**2`` per pair, which is what makes them ~10^6 times costlier in memory.
    """
    if spec.arch in ("convnet", "myrtle", "code") and len(input_shape) == 3:
        h, w = input_shape[0], input_shape[1]
        return (h * w) ** 2
    return 1


def bytes_per_pair(spec: KernelSpec, input_shape: tuple[int, ...]) -> int:
    """Estimated peak bytes per (x1, x2) pair in one kernel call (float32 intermediates, with headroom).

    Native convolutional kernels stream their pairs in steps of bounded size (``native.CHUNK_BYTES``), so a
    call needs only its outputs per pair; neural-tangents' keep ~16 arrays of the full spatial covariance.
    """
    from kernelscale.kernels import native as native_kernels  # noqa: PLC0415  (native imports jax)

    if native_kernels.supports(spec):
        return native_kernels.bytes_per_pair(spec, input_shape)
    live_arrays = 16  # nngp, ntk, cov1, cov2 and temporaries, measured to stay below this
    return 4 * live_arrays * spatial_pairs(spec, input_shape) + 64


def fixed_bytes(spec: KernelSpec, input_shape: tuple[int, ...]) -> int:
    """Working memory of one kernel call that does not grow with its number of pairs (native kernels' streamed
    steps and per-thread scratch); 0 for neural-tangents kernels, whose memory is all per pair."""
    from kernelscale.kernels import native as native_kernels  # noqa: PLC0415  (native imports jax)

    return native_kernels.fixed_bytes(spec, input_shape) if native_kernels.supports(spec) else 0
