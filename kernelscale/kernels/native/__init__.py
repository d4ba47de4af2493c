"""kernelscale's own exact kernels of the built-in architectures (fc, convnet, myrtle).

Same protocol as neural-tangents: ``kernel_fn(x1, x2=None, get="ntk")``; ``x2=None`` is x1 with itself, with
an exact diagonal. neural-tangents stays the reference the tests compare against, and the path for user code.

- :func:`supports` — whether a :class:`~kernelscale.kernels.KernelSpec` has a native kernel
- :func:`kernel_fn` — the spec's ``kernel_fn(x1, x2, get)``
- :func:`block_kernel`, :func:`symmetric_kernel` — jitted ``f(x1, x2) -> (n1, n2)`` and ``g(x) -> (n, n)``
  for one kernel, differentiable; ``g`` computes each unordered pair once
- :func:`gram_block`, :func:`gram_symmetric` — the forward Gram engine's calls: compiled CPU code (numba) for
  convolutional kernels on CPU, the JAX recursion on GPU
"""

from __future__ import annotations

from kernelscale.kernels.native._api import (
    CHUNK_BYTES,
    block_kernel,
    bytes_per_pair,
    fixed_bytes,
    gram_block,
    gram_symmetric,
    kernel_fn,
    supports,
    symmetric_kernel,
)

__all__ = ["CHUNK_BYTES", "block_kernel", "bytes_per_pair", "fixed_bytes", "gram_block", "gram_symmetric", "kernel_fn", "supports",
           "symmetric_kernel"]
