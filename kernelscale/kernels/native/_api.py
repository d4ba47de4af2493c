"""Build the native kernel of a spec: ``kernel_fn(x1, x2, get)``, block and symmetric Gram calls."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernelscale.kernels.native._conv import ConvNet
from kernelscale.kernels.native._fc import FCNet

#: Working set of one streamed step of pairs (bytes): small enough to stay in a CPU's last-level cache.
CHUNK_BYTES = 24 * 2**20
#: The same on an accelerator (GPU/TPU), at most: an eighth of the device's memory, so that a step keeps the
#: whole device busy (convnet-3 at 32x32 on an H200: 1,024 pairs per step, 1.6x the pairs/s of 233).
ACCELERATOR_CHUNK_BYTES = 16 * 2**30
#: float32 arrays of a pair's first-stage size alive at once in one step (covariances, NTK, temporaries)
LIVE_ARRAYS = 10
NATIVE_ACTIVATIONS = ("relu", "erf")


def supports(spec: Any) -> bool:
    """Whether ``spec`` (a KernelSpec) has a native kernel: fc with relu/erf, convnet, myrtle."""
    if spec.arch == "fc":
        return spec.params.get("activation", "relu") in NATIVE_ACTIVATIONS
    return spec.arch in ("convnet", "myrtle")


def _conv_net(spec: Any, shape: tuple[int, ...], ntk: bool) -> ConvNet:
    p = spec.params
    if len(shape) != 3:
        raise ValueError(f"{spec.arch} needs images (H, W, C); got rows of shape {shape}")
    build = ConvNet.convnet if spec.arch == "convnet" else ConvNet.myrtle
    return build(int(p["depth"]), float(p["W_std"]), float(p["b_std"]), int(shape[0]), int(shape[1]), ntk)


def pairs_per_step(spec: Any, shape: tuple[int, ...]) -> int:
    """Pairs of images computed at once in one streamed step of a convolutional kernel."""
    if spec.arch == "fc":
        return 1
    entries = _conv_net(spec, shape, True).entries_per_pair()
    if _cpu_backend():
        return max(1, CHUNK_BYTES // (4 * LIVE_ARRAYS * entries))
    pairs = max(1, _accelerator_bytes() // (4 * LIVE_ARRAYS * entries))
    return 1 << (pairs.bit_length() - 1)  # a power of two: steps tile the device's blocks evenly


def _accelerator_bytes() -> int:
    """Bytes one streamed step may use on the default accelerator: an eighth of its memory, at most 16 GiB."""
    try:
        limit = int(jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        limit = 8 * 2**30
    return min(ACCELERATOR_CHUNK_BYTES, limit // 8)


def bytes_per_pair(spec: Any, shape: tuple[int, ...]) -> int:
    """Peak bytes a block call needs per pair of inputs beyond its streamed steps (float32 outputs and
    indices, with headroom); the streamed steps themselves take at most ~``CHUNK_BYTES`` more."""
    return 64


def fixed_bytes(spec: Any, shape: tuple[int, ...]) -> int:
    """Working memory of a Gram call independent of its size: the JAX streamed step (``CHUNK_BYTES``) and, for
    convolutional kernels, the compiled path's per-thread scratch (stage buffers and slabs of 32 pairs)."""
    if spec.arch == "fc" or len(shape) != 3:
        return 0
    from kernelscale.kernels.native import _cpu  # noqa: PLC0415  (defers numba)

    net = _conv_net(spec, shape, True)
    _, dims, map_off, buf_off = _cpu.stage_plan(net.ops, shape[0], shape[1])
    h, w, c = shape
    per_lane = 2 * int(buf_off[-1]) + 3 * h * w + 2 * c * h * w + 4 * int(map_off[-1])
    return CHUNK_BYTES + cpu_threads() * 4 * _cpu.WIDTH * per_lane


def _map_pairs(net: ConvNet, x1: Any, x2: Any, var1: list[Any], var2: list[Any], ii: np.ndarray,
               jj: np.ndarray, step: int) -> tuple[Any, Any]:
    """``pairs(net, x1[ii], x2[jj], ...)`` streamed ``step`` pairs at a time: ``(nngp (P,), ntk (P,))``."""
    p = len(ii)
    pad = -p % step
    ii = np.concatenate([ii, np.zeros(pad, ii.dtype)]).reshape(-1, step)
    jj = np.concatenate([jj, np.zeros(pad, jj.dtype)]).reshape(-1, step)

    @jax.checkpoint  # gradients recompute each step's layers: memory stays one step's, not every pair's
    def one(idx: tuple[Any, Any]) -> tuple[Any, Any]:
        i, j = idx
        nngp, ntk, _ = net.layers(x1[i], x2[j], [v[i] for v in var1], [v[j] for v in var2])
        return nngp, (ntk if ntk is not None else nngp)

    nngp, ntk = jax.lax.map(one, (jnp.asarray(ii), jnp.asarray(jj)))
    return nngp.reshape(-1)[:p], ntk.reshape(-1)[:p]


def _self_pairs(net: ConvNet, x: Any, step: int) -> tuple[Any, Any, list[Any]]:
    """Every image with itself, streamed: ``(nngp (n,), ntk (n,), variance maps (n, H_k, W_k))``."""
    n = x.shape[0]
    pad = -n % step
    xs = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
    xs = xs.reshape(-1, step, *x.shape[1:])

    @jax.checkpoint
    def one(chunk: Any) -> tuple[Any, Any, list[Any]]:
        nngp, ntk, variances = net.layers(chunk, chunk, None, None)
        return nngp, (ntk if ntk is not None else nngp), variances

    nngp, ntk, variances = jax.lax.map(one, xs)
    unchunk = lambda a: a.reshape(-1, *a.shape[2:])[:n]  # noqa: E731
    return unchunk(nngp), unchunk(ntk), [unchunk(v) for v in variances]


def _conv_block(net: ConvNet, step: int, x1: Any, x2: Any | None) -> tuple[Any, Any]:
    n1 = x1.shape[0]
    nngp1, ntk1, var1 = _self_pairs(net, x1, step)
    if x2 is None:  # each unordered pair once; the diagonal from the self-pairs
        ii, jj = np.triu_indices(n1, 1)
        nngp, ntk = _map_pairs(net, x1, x1, var1, var1, ii, jj, step)
        out = []
        for vals, diag in ((nngp, nngp1), (ntk, ntk1)):
            k = jnp.zeros((n1, n1), vals.dtype).at[ii, jj].set(vals).at[jj, ii].set(vals)
            out.append(k.at[np.arange(n1), np.arange(n1)].set(diag))
        return out[0], out[1]
    n2 = x2.shape[0]
    _, _, var2 = _self_pairs(net, x2, step)
    ii, jj = np.divmod(np.arange(n1 * n2), n2)
    nngp, ntk = _map_pairs(net, x1, x2, var1, var2, ii, jj, step)
    return nngp.reshape(n1, n2), ntk.reshape(n1, n2)


def _block_fn(spec: Any, want_ntk: bool, step: int | None = None) -> Callable[[Any, Any | None], tuple[Any, Any]]:
    p = spec.params
    if spec.arch == "fc":
        fc = FCNet(int(p["depth"]), float(p["W_std"]), float(p["b_std"]), p.get("activation", "relu"), want_ntk)
        return fc.block

    def block(x1: Any, x2: Any | None) -> tuple[Any, Any]:
        net = _conv_net(spec, tuple(x1.shape[1:]), want_ntk)
        return _conv_block(net, step or pairs_per_step(spec, tuple(x1.shape[1:])), x1, x2)

    return block


def kernel_fn(spec: Any, step: int | None = None) -> Callable[..., Any]:
    """The spec's ``kernel_fn(x1, x2=None, get=None)``: ``get`` is "ntk", "nngp" or a tuple of them (None:
    both, as ``(nngp, ntk)``); ``x2=None`` is x1 with itself (each pair once, exact diagonal)."""

    # jitted once per kernel_fn (inlined under an outer jit): called eagerly, each input shape compiles once
    blocks = {want_ntk: jax.jit(_block_fn(spec, want_ntk, step)) for want_ntk in (False, True)}

    def fn(x1: Any, x2: Any | None = None, get: str | tuple[str, ...] | None = None) -> Any:
        if x2 is x1:  # K(x, x) (also for one traced array passed twice, as KIP's K_ss): exact diagonal
            x2 = None
        names = ("nngp", "ntk") if get is None else (get,) if isinstance(get, str) else tuple(get)
        nngp, ntk = blocks["ntk" in names](jnp.asarray(x1), None if x2 is None else jnp.asarray(x2))
        out = {"nngp": nngp, "ntk": ntk}
        return out[names[0]] if isinstance(get, str) else tuple(out[n] for n in names)

    return fn


def block_kernel(spec: Any, step: int | None = None) -> Callable[[Any, Any], Any]:
    """Jitted ``f(x1, x2) -> (n1, n2)`` of the spec's kernel (``spec.kernel``: ntk or nngp)."""
    fn = kernel_fn(spec, step)
    return jax.jit(lambda x1, x2: fn(x1, x2, spec.kernel))


def symmetric_kernel(spec: Any, step: int | None = None) -> Callable[[Any], Any]:
    """Jitted ``g(x) -> (n, n)``: x with itself, each unordered pair computed once, exact diagonal."""
    fn = kernel_fn(spec, step)
    return jax.jit(lambda x: fn(x, None, spec.kernel))


def _cpu_backend() -> bool:
    return jax.default_backend() == "cpu"


def cpu_threads() -> int:
    """Threads of the compiled CPU path: ``OMP_NUM_THREADS`` when set (Ray sets it to an actor's CPUs),
    else every CPU this process may run on."""
    import os  # noqa: PLC0415

    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0))


class CpuGram:
    """Forward Gram calls of a convolutional spec on CPU: per-image variances from the JAX self-pairs
    (exact diagonal), every other pair in compiled code (:mod:`._cpu`)."""

    def __init__(self, spec: Any, threads: int | None = None):
        self.spec = spec
        self.threads = threads or cpu_threads()
        self._self_fns: dict[tuple[int, ...], Callable] = {}

    def _net(self, shape: tuple[int, ...]) -> ConvNet:
        return _conv_net(self.spec, shape, self.spec.kernel == "ntk")

    def self_pairs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(K(x_i, x_i) (n,), variance maps (n, 2, total))`` of images ``(n, H, W, C)``."""
        from kernelscale.kernels.native import _cpu  # noqa: PLC0415  (defers numba)

        shape = tuple(x.shape[1:])
        step = pairs_per_step(self.spec, shape)
        if shape not in self._self_fns:  # one compilation per image shape: fixed-size calls of `step` images
            net = self._net(shape)
            self._self_fns[shape] = jax.jit(lambda a: net.layers(a, a, None, None))
        n = x.shape[0]
        padded = np.concatenate([x, np.repeat(x[:1], -n % step, axis=0)]).astype(np.float32)
        diags, maps = [], []
        for start in range(0, len(padded), step):
            nngp, ntk, variances = self._self_fns[shape](jnp.asarray(padded[start : start + step]))
            diags.append(np.asarray(ntk if self.spec.kernel == "ntk" else nngp))
            maps.append(_cpu.variance_maps([np.asarray(v) for v in variances]))
        return np.concatenate(diags)[:n], np.concatenate(maps)[:n]

    def _pairs(self, x1: np.ndarray, x2: np.ndarray, maps1: np.ndarray, maps2: np.ndarray, ii: np.ndarray,
               jj: np.ndarray) -> np.ndarray:
        import numba  # noqa: PLC0415

        from kernelscale.kernels.native import _cpu  # noqa: PLC0415  (defers numba)

        net = self._net(tuple(x1.shape[1:]))
        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        nngp, ntk = _cpu.gram_pairs(net.ops, net.w_std, net.b_std, net.ntk, x1, x2, maps1, maps2, ii, jj)
        return ntk if net.ntk else nngp

    def block(self, x1: Any, x2: Any) -> np.ndarray:
        """``(n1, n2)`` kernel block."""
        x1, x2 = np.asarray(x1, np.float32), np.asarray(x2, np.float32)
        _, maps1 = self.self_pairs(x1)
        _, maps2 = self.self_pairs(x2)
        ii, jj = np.divmod(np.arange(x1.shape[0] * x2.shape[0]), x2.shape[0])
        return self._pairs(x1, x2, maps1, maps2, ii, jj).reshape(x1.shape[0], x2.shape[0])

    def symmetric(self, x: Any) -> np.ndarray:
        """``(n, n)`` kernel of x with itself: each unordered pair once, the diagonal from the self-pairs."""
        x = np.asarray(x, np.float32)
        n = x.shape[0]
        diag, maps = self.self_pairs(x)
        ii, jj = np.triu_indices(n, 1)
        out = np.empty((n, n), np.float32)
        vals = self._pairs(x, x, maps, maps, ii, jj)
        out[ii, jj] = vals
        out[jj, ii] = vals
        out[np.arange(n), np.arange(n)] = diag
        return out


def gram_block(spec: Any, dtype: str = "float32") -> Callable[[Any, Any], Any]:
    """The Gram engine's ``f(x1, x2) -> (n1, n2)``: compiled CPU code for convolutional kernels in float32 on
    a CPU backend, the jitted JAX recursion otherwise."""
    if spec.arch != "fc" and dtype == "float32" and _cpu_backend():
        return CpuGram(spec).block
    return block_kernel(spec)


def gram_symmetric(spec: Any, dtype: str = "float32") -> Callable[[Any], Any]:
    """The Gram engine's ``g(x) -> (n, n)`` for diagonal blocks (each unordered pair once, exact diagonal)."""
    if spec.arch != "fc" and dtype == "float32" and _cpu_backend():
        return CpuGram(spec).symmetric
    return symmetric_kernel(spec)
