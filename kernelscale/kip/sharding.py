"""Sharded KIP: the target batch split across W workers (Ray actors), and K_ss tile-wise for large supports.

Each worker samples its own contiguous slice of the step's target batch from DATA (batches are a pure
function of ``(seed, step)``, see :mod:`kernelscale.kip.targets`), so no target data passes through the driver.
Per step the driver puts the support ``(x, y, key)`` into the object store once; every worker computes the
summed loss and gradient w.r.t. the support on its slice (split again across its local JAX devices); the
driver sums them and applies the optax update (:meth:`Kip.apply`). The result equals the single-process step
to float tolerance (only the order of the sums differs).

For large supports (``kss_tile`` set: ImageNet's 10,000 support images) K_ss is never built by one worker:
  1. workers compute the upper tiles of K_ss; the driver assembles K_ss and alpha = (K_ss + lam I)^-1 y_s;
  2. workers compute their target slices' loss, dL/dx_s through K_ts, and u = K_ts^T r;
  3. the driver forms dL/dK_ss (:func:`kip.kss_cotangent`) and workers take the vjp of their K_ss tiles.
:class:`LocalPool` runs the same worker code in-process (W = 1, tests); :class:`RayPool` runs it on actors.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernelscale.data import open_dataset
from kernelscale.kernels import KernelSpec, kernel_fn
from kernelscale.kip import step as kipmod
from kernelscale.kip.augment import TargetAugment
from kernelscale.kip.targets import DEFAULT_MEMORY_LIMIT, TargetSampler
from kernelscale.runtime import actor_options

log = logging.getLogger(__name__)


def pair_kernel(spec: KernelSpec) -> kipmod.PairKernel:
    """Differentiable ``f(x1, x2) -> (n1, n2)`` of a spec's kernel (not jitted: KIP jits the whole step)."""
    fn, get = kernel_fn(spec), spec.kernel
    return lambda x1, x2: fn(x1, x2, get)


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


class ShardWorker:
    """One worker's share of every KIP step: target slice ``part`` of ``parts``, and K_ss tiles on request.

    Runs in-process (:class:`LocalPool`) or as a Ray actor (:class:`RayPool`). Holds its own sampler and
    jitted functions; receives the support each step. ``target_transform`` is the adversarial-KIP hook,
    ``augment`` the target images' translations/flips (:mod:`kernelscale.kip.augment`).
    """

    def __init__(self, data_path: str, spec_json: str, *, lr: float, reg: float, learn_labels: bool, batch: int,
                 seed: int, part: int = 0, parts: int = 1, memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 target_transform: kipmod.TargetTransform | None = None, augment: TargetAugment | None = None,
                 sampling: str = "rows"):
        spec = KernelSpec.from_json(spec_json)
        self.kernel = pair_kernel(spec)
        self.kip = kipmod.make_kip(self.kernel, lr=lr, reg=reg, learn_labels=learn_labels,
                                   target_transform=target_transform)
        self.sampler = TargetSampler(open_dataset(data_path), batch, seed, memory_limit, augment, sampling)
        self.part, self.parts = part, parts
        self.devices = jax.local_devices()
        self._target_terms = jax.jit(lambda xs, al, xt, yt: kipmod.target_terms(self.kernel, xs, al, xt, yt))
        # K_ss tiles as functions of the sliced rows, not of static tile bounds: every full tile has the same
        # shapes, so one compilation serves all of them (bounds as static arguments compiled once per tile
        # position: 55 + 55 programs per worker for 10,000 images in tiles of 1,000, 1,275 x 2 for 50,000).
        self._block = jax.jit(lambda a, b: self.kernel(a, b))
        self._block_sym = jax.jit(lambda a: self.kernel(a, a))  # one array twice: symmetric, exact diagonal
        self._block_vjp = jax.jit(lambda a, b, cot: jax.vjp(self.kernel, a, b)[1](cot))
        self._block_sym_vjp = jax.jit(lambda a, cot: jax.vjp(lambda v: self.kernel(v, v), a)[1](cot)[0])

    def ready(self) -> int:
        return len(self.devices)

    def _state(self, support: tuple[np.ndarray, np.ndarray, np.ndarray], step: int) -> kipmod.KipState:
        x, y, key = support
        return kipmod.KipState(jnp.asarray(x), jnp.asarray(y), None, jnp.asarray(key), jnp.asarray(step, jnp.int32))

    def _split(self, x_t: np.ndarray, y_t: np.ndarray) -> list[tuple[Any, Any, Any]]:
        """The slice split across local devices: [(device, x part, y part)] (one part on one device)."""
        if len(self.devices) == 1:
            return [(self.devices[0], x_t, y_t)]
        return [(d, xp, yp) for d, xp, yp in zip(self.devices, np.array_split(x_t, len(self.devices)),
                                                 np.array_split(y_t, len(self.devices))) if len(xp)]

    def grads(self, support: tuple[np.ndarray, np.ndarray, np.ndarray], step: int) -> dict[str, Any]:
        """Summed loss, correct count and gradients of this worker's target slice at ``step`` (numpy)."""
        t0 = time.perf_counter()
        x_t, y_t = self.sampler.batch(step, self.part, self.parts)
        t1 = time.perf_counter()
        state = self._state(support, step)
        outs = [self.kip.shard_loss_and_grads(jax.device_put(state, d), (jax.device_put(xp, d), jax.device_put(yp, d)))
                for d, xp, yp in self._split(x_t, y_t)]
        total = _to_numpy(jax.tree_util.tree_map(lambda *v: sum(v[1:], v[0]), *outs)) if len(outs) > 1 else _to_numpy(outs[0])
        total["count"] = len(x_t)
        total["read_seconds"] = t1 - t0
        total["compute_seconds"] = time.perf_counter() - t1
        return total

    # -- tile-wise K_ss ------------------------------------------------------------------------------------
    def kss_tiles(self, x_s: np.ndarray, tiles: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
        xs = np.asarray(x_s)  # sliced on the host: an eager jnp slice would compile once per position too
        return [np.asarray(self._block_sym(xs[r0:r1]) if (r0, r1) == (c0, c1) else self._block(xs[r0:r1], xs[c0:c1]))
                for r0, r1, c0, c1 in tiles]

    def target_terms(self, support: tuple[np.ndarray, np.ndarray, np.ndarray], alpha: np.ndarray, step: int) -> dict[str, Any]:
        x_t, y_t = self.sampler.batch(step, self.part, self.parts)
        state = self._state(support, step)
        x_t, y_t = self.kip._transform(state, jnp.asarray(x_t), jnp.asarray(y_t))
        out = _to_numpy(self._target_terms(state.x, jnp.asarray(alpha), x_t, y_t))
        out["count"] = len(x_t)
        return out

    def kss_vjp(self, x_s: np.ndarray, tiles: list[tuple[int, int, int, int]], grad_kss: np.ndarray) -> np.ndarray:
        """Sum over this worker's tiles of :func:`kip.kss_tile_vjp` (the same cotangents, one compilation)."""
        xs, g = np.asarray(x_s), np.asarray(grad_kss)
        total = np.zeros(x_s.shape, np.float32)
        for r0, r1, c0, c1 in tiles:
            cot = g[r0:r1, c0:c1]
            if (r0, r1) == (c0, c1):
                total[r0:r1] += np.asarray(self._block_sym_vjp(xs[r0:r1], cot))
                continue
            ga, gb = self._block_vjp(xs[r0:r1], xs[c0:c1], cot + g[c0:c1, r0:r1].T)
            total[r0:r1] += np.asarray(ga)
            total[c0:c1] += np.asarray(gb)
        return total


class LocalPool:
    """Workers in this process (no Ray): the same code path as :class:`RayPool`."""

    def __init__(self, workers: list[ShardWorker]):
        self.workers = workers

    def share(self, value: Any) -> Any:
        return value

    def map(self, method: str, args: list[tuple[Any, ...]]) -> list[Any]:
        return [getattr(w, method)(*a) for w, a in zip(self.workers, args)]

    def close(self) -> None:
        self.workers = []


class RayPool:
    """W Ray actors running :class:`ShardWorker`; values are shared through the object store."""

    def __init__(self, make_args: Callable[[int], tuple[tuple, dict]], workers: int, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0):
        import ray  # noqa: PLC0415

        self._ray = ray
        opts = actor_options(gpus_per_worker, cpus_per_worker)
        opts.pop("max_task_retries", None)  # a retried grads() call would be fine, but fail loudly instead
        cls = ray.remote(ShardWorker).options(**opts)
        self.workers = []
        for w in range(workers):
            args, kwargs = make_args(w)
            self.workers.append(cls.remote(*args, **kwargs))
        ray.get([a.ready.remote() for a in self.workers])

    def share(self, value: Any) -> Any:
        return self._ray.put(value)

    def map(self, method: str, args: list[tuple[Any, ...]]) -> list[Any]:
        return self._ray.get([getattr(a, method).remote(*ar) for a, ar in zip(self.workers, args)])

    def close(self) -> None:
        for a in self.workers:
            self._ray.kill(a)
        self.workers = []


def _tree_sum(parts: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: sum((np.asarray(p[k]) for p in parts[1:]), np.asarray(parts[0][k])) for k in keys}


def sharded_sums(pool: LocalPool | RayPool, state: kipmod.KipState, step: int) -> tuple[dict[str, Any], int, dict[str, float]]:
    """Loss/gradient sums of the step's whole target batch over the pool's workers, and timings (seconds)."""
    t0 = time.perf_counter()
    support = pool.share((np.asarray(state.x), np.asarray(state.y), np.asarray(state.key)))
    t1 = time.perf_counter()
    parts = pool.map("grads", [(support, step)] * len(pool.workers))
    t2 = time.perf_counter()
    sums = _tree_sum(parts, ("loss", "correct", "gx", "gy"))
    count = int(sum(p["count"] for p in parts))
    work = max(p["read_seconds"] + p["compute_seconds"] for p in parts)
    timing = {"put": t1 - t0, "workers": t2 - t1, "worker_max": work, "comm": (t2 - t0) - work}
    return sums, count, timing


def tiled_sums(pool: LocalPool | RayPool, state: kipmod.KipState, step: int, tile: int, reg: float
               ) -> tuple[dict[str, Any], int, dict[str, float]]:
    """Like :func:`sharded_sums`, with K_ss computed tile-wise across the workers (see the module doc)."""
    t0 = time.perf_counter()
    x_s, y_s = np.asarray(state.x), np.asarray(state.y)
    n, w = x_s.shape[0], len(pool.workers)
    tiles = kipmod.tile_pairs(n, tile)
    assignment = [tiles[i::w] for i in range(w)]
    x_ref = pool.share(x_s)
    blocks = pool.map("kss_tiles", [(x_ref, a) for a in assignment])
    k_ss = np.empty((n, n), np.float32)
    for a, bs in zip(assignment, blocks):
        for (r0, r1, c0, c1), b in zip(a, bs):
            k_ss[r0:r1, c0:c1] = b
            k_ss[c0:c1, r0:r1] = b.T
    factors = kipmod.factor_kss(jnp.asarray(k_ss), reg)  # once per step: alpha and the cotangent's solve
    alpha = np.asarray(kipmod.solve_kss(factors, jnp.asarray(y_s)))
    support = pool.share((x_s, y_s, np.asarray(state.key)))
    alpha_ref = pool.share(alpha)
    parts = pool.map("target_terms", [(support, alpha_ref, step)] * w)
    sums = _tree_sum(parts, ("loss", "correct", "gx", "u"))
    grad_kss, gy = kipmod.kss_cotangent(jnp.asarray(k_ss), jnp.asarray(alpha), jnp.asarray(sums.pop("u")), reg, factors)
    g_ref = pool.share(np.asarray(grad_kss))
    gx_tiles = pool.map("kss_vjp", [(x_ref, a, g_ref) for a in assignment])
    sums["gx"] = sums["gx"] + sum(gx_tiles[1:], gx_tiles[0])
    sums["gy"] = np.asarray(gy)
    count = int(sum(p["count"] for p in parts))
    return sums, count, {"workers": time.perf_counter() - t0}
