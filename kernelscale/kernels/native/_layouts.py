"""Two storage layouts of a pair's spatial covariance, with the exact layer maps on each.

A convolutional kernel tracks, for each pair of images (a, b), the covariance ``cov[(y, x), (y', x')]`` between
every position of a's activations and every position of b's. Two layouts hold it:

* :class:`FullLayout`, ``(P, H, W, H', W')``: every pair of positions (what neural-tangents keeps). Needed when
  the network ends in global pooling (Myrtle).
* :class:`BandLayout`, ``(P, 2Dy+1, H, 2Dx+1, W)``: entry ``[dy, y, dx, x]`` is ``cov[(y, x), (y+dy, x+dx)]``
  for offsets ``|dy| <= Dy``, ``|dx| <= Dx``. A SAME 3x3 convolution and an elementwise activation keep each
  entry's offset, and a 2x2 stride-2 average pool maps input offsets ``2e + {-1, 0, 1}`` to output offset
  ``e``; a network that ends in Flatten reads only offset 0, so after L pools only ``|d| <= 2**L - 1`` is
  ever needed (KIP's ConvNet: 180k of 1.05M entries per pair at 32x32). Entries whose second position lies
  outside the image are held at exactly 0 (``mask``), which is what SAME zero padding makes them.

Both layouts expose the same operations, each exact (no approximation anywhere):

* ``first_conv(a, b)``: the first 3x3 SAME convolution's input covariance, ``(patch_a . patch_b) / (9 C)``:
  a GEMM on 3x3 patches (full) or channel products plus a separable 3+3 box sum (band);
* ``conv(t)``: a later 3x3 SAME convolution, ``(1/9) sum of the 9 diagonal shifts``, as separable shifted sums
  (3 + 3 adds per entry), never a dense convolution;
* ``variance(t)``: the per-position variances ``cov[p, p]`` of a self-pair, ``(P, H, W)``;
* ``pair_variances(v1, v2)``: v1 at the first position and v2 at the second, broadcast to the layout;
* ``pool(t)``: 2x2 stride-2 average pooling (VALID, as ``stax.AvgPool((2, 2), strides=(2, 2))``);
* ``readout(t)``: Flatten + Dense's input covariance, the mean of ``cov[p, p]`` over positions, ``(P,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax


def _box3(t: Any, axis: int) -> Any:
    """Sum of the three shifts -1, 0, +1 of ``t`` along ``axis``, zero outside (SAME padding)."""
    pad = [(0, 0)] * t.ndim
    pad[axis] = (1, 1)
    tp = jnp.pad(t, pad)
    n = t.shape[axis]
    return sum(lax.slice_in_dim(tp, k, k + n, axis=axis) for k in range(3))


def _box3_diag(t: Any, axis1: int, axis2: int) -> Any:
    """Sum of the three joint shifts -1, 0, +1 of ``t`` along two axes at once (the diagonal of a 3-tap conv)."""
    pad = [(0, 0)] * t.ndim
    pad[axis1] = pad[axis2] = (1, 1)
    tp = jnp.pad(t, pad)
    n1, n2 = t.shape[axis1], t.shape[axis2]
    out = 0
    for k in range(3):
        s = lax.slice_in_dim(tp, k, k + n1, axis=axis1)
        out = out + lax.slice_in_dim(s, k, k + n2, axis=axis2)
    return out


def _windows(v: Any, dy: int, dx: int, fill: float) -> Any:
    """``out[p, i, y, j, x] = v[p, y + i - dy, x + j - dx]`` (``fill`` outside): shape (P, 2dy+1, H, 2dx+1, W)."""
    _, h, w = v.shape[:3]
    vp = jnp.pad(v, [(0, 0), (dy, dy), (dx, dx)] + [(0, 0)] * (v.ndim - 3), constant_values=fill)
    rows = jnp.stack([vp[:, k : k + h] for k in range(2 * dy + 1)], axis=1)  # (P, 2dy+1, H, W+2dx, ...)
    return jnp.stack([rows[:, :, :, k : k + w] for k in range(2 * dx + 1)], axis=3)


def _patches(x: Any) -> Any:
    """Zero-padded 3x3 patches of images ``(P, H, W, C)`` -> ``(P, H, W, 9 C)``."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    return jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1)


@dataclass(frozen=True)
class FullLayout:
    """Every pair of positions: ``(P, H, W, H', W')``."""

    h: int
    w: int

    def first_conv(self, a: Any, b: Any) -> Any:
        pa, pb = _patches(a), _patches(b)
        return jnp.einsum("pyxk,pzwk->pyxzw", pa, pb, precision="highest") / pa.shape[-1]  # no TF32 on GPUs

    def conv(self, t: Any) -> Any:
        return _box3_diag(_box3_diag(t, 1, 3), 2, 4) / 9.0

    def variance(self, t: Any) -> Any:
        p = t.shape[0]
        flat = t.reshape(p, self.h * self.w, self.h * self.w)
        return jnp.diagonal(flat, axis1=1, axis2=2).reshape(p, self.h, self.w)

    def pair_variances(self, v1: Any, v2: Any) -> tuple[Any, Any]:
        return v1[:, :, :, None, None], v2[:, None, None, :, :]

    def mask(self, t: Any) -> Any:
        return t

    def pool(self, t: Any) -> tuple[Any, "FullLayout"]:
        h, w = self.h // 2, self.w // 2
        t = t[:, : 2 * h, : 2 * w, : 2 * h, : 2 * w]
        t = t.reshape(t.shape[0], h, 2, w, 2, h, 2, w, 2).mean(axis=(2, 4, 6, 8))
        return t, FullLayout(h, w)

    def readout(self, t: Any) -> Any:
        return self.variance(t).mean(axis=(1, 2))


@dataclass(frozen=True)
class BandLayout:
    """Offsets ``|dy| <= dy_max``, ``|dx| <= dx_max`` from each position: ``(P, 2dy+1, H, 2dx+1, W)``."""

    h: int
    w: int
    dy: int
    dx: int

    def valid(self) -> np.ndarray:
        """1.0 where the second position ``(y + dy, x + dx)`` lies inside the image, else 0.0."""
        my = np.array([[0 <= y + d < self.h for y in range(self.h)] for d in range(-self.dy, self.dy + 1)])
        mx = np.array([[0 <= x + d < self.w for x in range(self.w)] for d in range(-self.dx, self.dx + 1)])
        return (my[:, :, None, None] & mx[None, None, :, :]).astype(np.float32)

    def first_conv(self, a: Any, b: Any) -> Any:
        c = a.shape[-1]
        win = _windows(b, self.dy, self.dx, 0.0)  # (P, 2dy+1, H, 2dx+1, W, C)
        cov = jnp.sum(a[:, None, :, None, :, :] * win, axis=-1) / c
        return self.conv(cov)

    def conv(self, t: Any) -> Any:
        return _box3(_box3(t, 2), 4) / 9.0

    def variance(self, t: Any) -> Any:
        return t[:, self.dy, :, self.dx, :]

    def pair_variances(self, v1: Any, v2: Any) -> tuple[Any, Any]:
        return v1[:, None, :, None, :], _windows(v2, self.dy, self.dx, 1.0)

    def mask(self, t: Any) -> Any:
        return t * self.valid().astype(t.dtype)

    def pool(self, t: Any) -> tuple[Any, "BandLayout"]:
        assert self.dy >= 1 and self.dx >= 1, "a pool needs offsets -1..1 of its input"
        nxt = BandLayout(self.h // 2, self.w // 2, (self.dy - 1) // 2, (self.dx - 1) // 2)
        t = _pool_band_axis(t, 1, 2, self.dy, nxt.dy, nxt.h)
        t = _pool_band_axis(t, 3, 4, self.dx, nxt.dx, nxt.w)
        return nxt.mask(t), nxt

    def readout(self, t: Any) -> Any:
        return self.variance(t).mean(axis=(1, 2))


def _pool_band_axis(t: Any, d_axis: int, y_axis: int, d: int, e: int, n_out: int) -> Any:
    """2x2 average pool along one spatial axis of a band: out[e, p] = mean over a, b in {0, 1} of
    cov[2p + a, 2(p + e) + b] = (t[2e, 2p] + t[2e+1, 2p] + t[2e-1, 2p+1] + t[2e, 2p+1]) / 4."""

    def take(d_off: int, y_off: int) -> Any:
        d0 = d - 2 * e + d_off
        s = lax.slice_in_dim(t, d0, d0 + 4 * e + 1, stride=2, axis=d_axis)
        return lax.slice_in_dim(s, y_off, y_off + 2 * n_out - 1, stride=2, axis=y_axis)

    return 0.25 * (take(0, 0) + take(1, 0) + take(-1, 1) + take(0, 1))
