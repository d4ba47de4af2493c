"""Kernel sources: what the Gram engine computes a Gram from.

A :class:`KernelSource` names a kernel (its canonical JSON, which the Gram store records and its fingerprint
binds), builds its jitted block function ``f(x1, x2) -> (n1, n2)``, and says how much memory one kernel call
needs per pair of inputs (the engine sizes its kernel calls from that and the per-worker memory budget).

Two kinds implement it: :class:`~kernelscale.kernels.spec.KernelSpec` (built-in architectures, and ``--arch
module:function`` user code as a ``code`` spec) and :class:`CallableKernel` (a Python ``kernel_fn(x1, x2, get)``
passed to ``compute_gram``). Built-in kernels know their memory; user code is measured by
:func:`traced_bytes_per_pair`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from kernelscale.errors import InputError
from kernelscale.kernels.blocks import pairwise
from kernelscale.kernels.spec import KERNELS

#: Rows of the two probe blocks user kernels are traced on (shapes only; nothing is computed). Large enough that
#: arrays growing with the rows alone (inputs, per-row variances) add little per pair: a (rows, 784) float32
#: array adds 784 * 4 * 128 / (256**2 - 128**2) ~ 8 bytes per pair.
PROBE_ROWS = (128, 256)
#: Least bytes per pair: the float32 output plus indices, as for built-in kernels.
MIN_BYTES_PER_PAIR = 64


@runtime_checkable
class KernelSource(Protocol):
    """A kernel the Gram engine can compute: canonical JSON, a block function and its memory per pair."""

    def to_json(self) -> dict[str, Any]:
        """The kernel as the Gram store records it: ``{"arch", "params", "kernel"}``."""
        ...

    def canonical(self) -> str:
        """:meth:`to_json` as canonical JSON (sorted keys, no spaces): what fingerprints hash."""
        ...

    def block_fn(self) -> Callable[[Any, Any], Any]:
        """The jitted ``f(x1, x2) -> (n1, n2)`` kernel block of ``(n1, *shape)`` and ``(n2, *shape)`` inputs."""
        ...

    def bytes_per_pair(self, input_shape: tuple[int, ...]) -> int:
        """Peak bytes of one kernel call per (x1, x2) pair, float32, for rows of ``input_shape``."""
        ...

    def fixed_bytes(self, input_shape: tuple[int, ...]) -> int:
        """Working bytes of one kernel call that do not grow with its number of pairs."""
        ...


@dataclass(frozen=True)
class CallableKernel:
    """A user's ``kernel_fn(x1, x2, get)`` callable named by ``kernel_id`` (which enters the fingerprint)."""

    fn: Callable[..., Any] = field(compare=False)
    kernel_id: str
    get: str = "ntk"

    def __post_init__(self) -> None:
        if not self.kernel_id:
            raise InputError(
                "compute_gram with a kernel_fn callable needs kernel_id='a-name-for-this-kernel': it enters the "
                "Gram's fingerprint, so a resumed run can tell whether the kernel is the same"
            )
        if self.get not in KERNELS:
            raise InputError(f"get must be one of {', '.join(KERNELS)}, got {self.get!r}")

    def to_json(self) -> dict[str, Any]:
        return {"arch": "callable", "params": {"kernel_id": str(self.kernel_id)}, "kernel": self.get}

    def canonical(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def block_fn(self) -> Callable[[Any, Any], Any]:
        return pairwise(self.fn, self.get)

    def bytes_per_pair(self, input_shape: tuple[int, ...]) -> int:
        return traced_bytes_per_pair(self.block_fn(), input_shape)

    def fixed_bytes(self, input_shape: tuple[int, ...]) -> int:
        return 0


def traced_bytes_per_pair(block_fn: Callable[[Any, Any], Any], input_shape: tuple[int, ...]) -> int:
    """Bytes per pair of a user kernel call, from the peak live memory of its traced program.

    The kernel is traced (``jax.make_jaxpr``: shapes only, no compute, no compilation) on float32 blocks of
    :data:`PROBE_ROWS` rows, and each trace's peak is the largest sum of array sizes alive at once, walking the
    program's operations in order (nested programs: their own peak on top of what is alive around them). The
    growth of that peak between the two probes, divided by the growth in pairs, is the memory per pair: an fc
    kernel keeps a few (n1, n2) arrays (tens of bytes per pair), a convolutional one a few (n1, n2, H*W, H*W)
    arrays; at least :data:`MIN_BYTES_PER_PAIR`.

    Why tracing and not XLA's compiled memory analysis: compiling a neural-tangents kernel takes seconds to a
    minute on a CPU (twice, for two probes), tracing a fraction of that; and the unfused trace bounds XLA's
    fused peak from above (measured here: XLA's temp + output bytes per pair were 0.63 of the traced figure for
    a neural-tangents fc NTK, 0.45 for a convnet:depth=2 NTK of 8x8 images), so no further headroom is added.
    """
    import jax  # noqa: PLC0415 - JAX loads only when a kernel is measured

    small, large = PROBE_ROWS
    peaks = []
    for rows in (small, large):
        x = jax.ShapeDtypeStruct((rows, *input_shape), "float32")
        peaks.append(peak_live_bytes(jax.make_jaxpr(block_fn)(x, x).jaxpr))
    per_pair = max(0, peaks[1] - peaks[0]) / (large * large - small * small)
    return max(MIN_BYTES_PER_PAIR, math.ceil(per_pair))


def peak_live_bytes(jaxpr: Any) -> int:
    """Largest total size in bytes of the arrays alive at once while ``jaxpr``'s equations run in order.

    An array is alive from the equation that makes it (or from the start, for inputs and constants) to its last
    use. An equation with nested programs (jit, scan, custom derivatives, ...) adds their own peak to what is
    alive around it; otherwise its outputs.
    """
    from jax.extend.core import Var  # noqa: PLC0415 - JAX loads only when a kernel is measured

    eqns = list(jaxpr.eqns)
    last_use: dict[Any, int] = {}
    for k, eqn in enumerate(eqns):
        for v in eqn.invars:
            if isinstance(v, Var):
                last_use[v] = k
    for v in jaxpr.outvars:
        if isinstance(v, Var):
            last_use[v] = len(eqns)
    live = {v: _nbytes(v) for v in [*jaxpr.constvars, *jaxpr.invars]}
    peak = sum(live.values())
    for k, eqn in enumerate(eqns):
        inner = max((peak_live_bytes(sub) for sub in _nested(eqn.params.values())), default=0)
        outputs = sum(_nbytes(v) for v in eqn.outvars)
        peak = max(peak, sum(live.values()) + max(inner, outputs))
        for v in eqn.outvars:
            if v in last_use:
                live[v] = _nbytes(v)
        for v in eqn.invars:
            if isinstance(v, Var) and last_use.get(v) == k:
                live.pop(v, None)
    return peak


def _nested(values: Any) -> Iterator[Any]:
    """The jaxprs among an equation's parameters (ClosedJaxpr, Jaxpr, or tuples/lists of them)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr  # noqa: PLC0415 - JAX loads only when a kernel is measured

    for value in values:
        if isinstance(value, ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _nested(value)


def _nbytes(var: Any) -> int:
    aval = getattr(var, "aval", None)
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return int(math.prod(shape)) * int(dtype.itemsize)
