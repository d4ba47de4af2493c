"""Compiled CPU path (numba) for forward Gram blocks of the convolutional kernels.

The same recursion as :mod:`kernelscale.kernels.native._conv` in :class:`~._layouts.BandLayout` form, fused per
offset: a SAME convolution and an elementwise activation keep each covariance entry's spatial offset
``(dy, dx)``, so everything between two pools is computed on one offset's ``H x W`` slab at a time, in the
L1 cache, and the slab is then pooled straight into the next stage's band. A network ending in global pooling
(Myrtle) takes every offset; only each slab's valid rectangle (both positions inside the image) is computed,
so no work is spent on padding. Per-image quantities (variance maps of every activation, from the JAX
self-pairs) are computed once per block, not once per pair. Pairs are spread over threads with ``prange``.

Equal to the JAX path to float32 rounding (tested); used for forward Gram tiles on CPU only (no gradients).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

OP_CONV, OP_ACT = 0, 1
PI = math.pi
INV_TWO_PI = 1.0 / (2.0 * math.pi)
#: a correlation within this of 1 is 1 (it is below float32's rounding of c / sqrt(v1 v2))
SNAP = 1.0 - 4.8e-7
#: pairs computed together by one thread, innermost (vectorised) in every loop
WIDTH = 32


@njit(cache=True, fastmath=True)
def _box_rows(src: np.ndarray, tmp: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
    """tmp = src summed over the shifts x-1, x, x+1 inside [x0, x1) (zero outside), rows [y0, y1)."""
    n_p = src.shape[2]
    for y in range(y0, y1):
        if x1 - x0 == 1:
            for p in range(n_p):
                tmp[y, x0, p] = src[y, x0, p]
            continue
        for p in range(n_p):
            tmp[y, x0, p] = src[y, x0, p] + src[y, x0 + 1, p]
        for x in range(x0 + 1, x1 - 1):
            for p in range(n_p):
                tmp[y, x, p] = src[y, x - 1, p] + src[y, x, p] + src[y, x + 1, p]
        for p in range(n_p):
            tmp[y, x1 - 1, p] = src[y, x1 - 2, p] + src[y, x1 - 1, p]


@njit(cache=True, fastmath=True, inline="always")
def _box_cols(tmp: np.ndarray, y: int, x: int, p: int, up: bool, down: bool) -> np.float32:
    """The vertical pass at (y, x, p): rows y-1 (if ``up``), y and y+1 (if ``down``) of the row sums ``tmp``."""
    s = tmp[y, x, p]
    if up:
        s = tmp[y - 1, x, p] + s
    if down:
        s = s + tmp[y + 1, x, p]
    return s


@njit(cache=True, fastmath=True)
def _conv_nngp(src: np.ndarray, dst: np.ndarray, copy: np.ndarray, tmp: np.ndarray, y0: int, y1: int, x0: int,
               x1: int, scale: np.float32, shift: np.float32, with_copy: bool) -> None:
    """dst = scale * (3x3 box sum of src over the rectangle, zero outside) + shift; also into ``copy`` when
    ``with_copy`` (the first layer's NTK equals its NNGP). dst may be src."""
    n_p = src.shape[2]
    _box_rows(src, tmp, y0, y1, x0, x1)
    for y in range(y0, y1):
        up, down = y > y0, y + 1 < y1
        for x in range(x0, x1):
            for p in range(n_p):
                dst[y, x, p] = scale * _box_cols(tmp, y, x, p, up, down) + shift
            if with_copy:
                for p in range(n_p):
                    copy[y, x, p] = dst[y, x, p]


@njit(cache=True, fastmath=True)
def _conv_ntk(st: np.ndarray, sn: np.ndarray, tmp: np.ndarray, y0: int, y1: int, x0: int, x1: int,
              scale: np.float32) -> None:
    """st = sn + scale * (3x3 box sum of st over the rectangle, zero outside): a conv layer's NTK."""
    n_p = st.shape[2]
    _box_rows(st, tmp, y0, y1, x0, x1)
    for y in range(y0, y1):
        up, down = y > y0, y + 1 < y1
        for x in range(x0, x1):
            for p in range(n_p):
                st[y, x, p] = sn[y, x, p] + scale * _box_cols(tmp, y, x, p, up, down)


@njit(cache=True, fastmath=True)
def _relu(sn: np.ndarray, st: np.ndarray, maps1: np.ndarray, maps2: np.ndarray, m: int, w: int,
          y0: int, y1: int, x0: int, x1: int, dy: int, dx: int) -> None:
    """ReLU arc-cosine terms on a slab (H, W, P), branch-free over the pairs: sn <- nngp', st <- st * dot.

    ``maps*[0]``/``maps*[1]`` hold sqrt(v) and 1/sqrt(v) (positions at ``m + y * w + x``, then pairs).
    arccos is Cephes' asinf polynomial: asin(u) for u <= 0.5, with u = sqrt((1 - |rho|) / 2) above 0.5
    (``sqrt(z)`` is ``|rho|`` exactly below 0.5, so one square root serves both branches)."""
    one, half = np.float32(1.0), np.float32(0.5)
    pi, inv = np.float32(PI), np.float32(INV_TWO_PI)
    n_p = sn.shape[2]
    for y in range(y0, y1):
        for x in range(x0, x1):
            i1 = m + y * w + x
            i2 = m + (y + dy) * w + x + dx
            for p in range(n_p):
                rho = sn[y, x, p] * maps1[1, i1, p] * maps2[1, i2, p]
                g = maps1[0, i1, p] * maps2[0, i2, p]
                rho = min(max(rho, -one), one)
                rho = one if rho > np.float32(SNAP) else rho
                a = abs(rho)
                big = a > half
                z = half * (one - a) if big else a * a
                u = math.sqrt(z)
                poly = (((np.float32(4.2163199048e-2) * z + np.float32(2.4181311049e-2)) * z
                         + np.float32(4.5470025998e-2)) * z + np.float32(7.4953002686e-2)) * z
                s = (poly + np.float32(1.6666752422e-1)) * z * u + u
                acos_a = np.float32(2.0) * s if big else np.float32(PI / 2) - s
                theta = pi - acos_a if rho < 0 else acos_a
                sin = math.sqrt((one - rho) * (one + rho))
                sn[y, x, p] = g * (sin + (pi - theta) * rho) * inv
                st[y, x, p] = st[y, x, p] * (pi - theta) * inv


@njit(cache=True, inline="always")
def _pool_span(d: int, t: int, lo: int, hi: int, n_next: int) -> tuple[int, int, int]:
    """One axis of the 2x2 pool: slab offset ``d``, window half ``t`` (0 or 1) -> ``(e, start, stop)``, the next
    stage's offset (d/2 for even d, (d-1)/2 + t for odd d) and the range of its positions that slab [lo, hi) feeds."""
    e = d // 2 if d % 2 == 0 else (d - 1) // 2 + t
    return e, max(0, -e, (lo - t + 1) // 2), min(n_next, n_next - e, (hi - 1 - t) // 2 + 1)


@njit(cache=True, fastmath=True)
def _pairs_batch(a: np.ndarray, b: np.ndarray, maps1: np.ndarray, maps2: np.ndarray, stage_ops: np.ndarray,
                 dims: np.ndarray, map_off: np.ndarray, w2: float, b2: float, ntk: bool,
                 bufs: np.ndarray, buf_off: np.ndarray, sn: np.ndarray, st: np.ndarray, tmp: np.ndarray,
                 out_nn: np.ndarray, out_nt: np.ndarray) -> None:
    """P pairs at once, pairs innermost (one vector): images ``a``, ``b`` (C, H, W, P); ``maps*`` (2, total,
    P) sqrt(v) and 1/sqrt(v) per activation, flattened at ``map_off``; ``stage_ops[k]`` ops of stage k
    (-1 padded); ``dims[k]`` = (H, W, Dy, Dx). Writes ``out_nn``/``out_nt`` (P,)."""
    n_stages = dims.shape[0]
    c_in = a.shape[0]
    n_p = a.shape[3]
    w2f, b2f = np.float32(w2), np.float32(b2)
    w2_9 = np.float32(w2 / 9.0)
    scale0 = np.float32(w2 / (9.0 * c_in))
    q16 = np.float32(0.0625)
    act = 0
    for k in range(n_stages):
        h, w, dy_max, dx_max = dims[k, 0], dims[k, 1], dims[k, 2], dims[k, 3]
        nwd = 2 * dx_max + 1
        last = k == n_stages - 1
        hn, wn, ey_max, ex_max, nwe = 0, 0, 0, 0, 1
        if not last:
            hn, wn, ey_max, ex_max = dims[k + 1, 0], dims[k + 1, 1], dims[k + 1, 2], dims[k + 1, 3]
            nwe = 2 * ex_max + 1
            bufs[:, buf_off[k + 1] : buf_off[k + 2], :] = 0.0
        act_start = act
        for iy in range(2 * dy_max + 1):
            dy = iy - dy_max
            if last and dy != 0:
                continue
            y0, y1 = max(0, -dy), min(h, h - dy)
            if y0 >= y1:
                continue
            for ix in range(nwd):
                dx = ix - dx_max
                if last and dx != 0:
                    continue
                x0, x1 = max(0, -dx), min(w, w - dx)
                if x0 >= x1:
                    continue
                act = act_start
                first_op = 0
                if k == 0:  # the first convolution on the input covariance: channel products, then box
                    for y in range(y0, y1):
                        for x in range(x0, x1):
                            for p in range(n_p):
                                sn[y, x, p] = a[0, y, x, p] * b[0, y + dy, x + dx, p]
                            for ch in range(1, c_in):
                                for p in range(n_p):
                                    sn[y, x, p] += a[ch, y, x, p] * b[ch, y + dy, x + dx, p]
                    _conv_nngp(sn, sn, st, tmp, y0, y1, x0, x1, scale0, b2f, True)
                    first_op = 1
                else:
                    o = buf_off[k]
                    for y in range(y0, y1):
                        base = o + ((iy * h + y) * nwd + ix) * w
                        for x in range(x0, x1):
                            for p in range(n_p):
                                sn[y, x, p] = bufs[0, base + x, p]
                                st[y, x, p] = bufs[1, base + x, p]
                for j in range(first_op, stage_ops.shape[1]):
                    op = stage_ops[k, j]
                    if op == OP_CONV:
                        _conv_nngp(sn, sn, st, tmp, y0, y1, x0, x1, w2_9, b2f, False)
                        if ntk:
                            _conv_ntk(st, sn, tmp, y0, y1, x0, x1, w2_9)
                    elif op == OP_ACT:
                        _relu(sn, st, maps1, maps2, map_off[act], w, y0, y1, x0, x1, dy, dx)
                        act += 1
                if last:  # Flatten + Dense: the mean over positions of offset 0
                    for p in range(n_p):
                        out_nn[p] = 0.0
                        out_nt[p] = 0.0
                    for y in range(h):
                        for x in range(w):
                            for p in range(n_p):
                                out_nn[p] += sn[y, x, p]
                                out_nt[p] += st[y, x, p]
                    for p in range(n_p):
                        out_nn[p] = w2f * out_nn[p] / np.float32(h * w) + b2f
                        out_nt[p] = out_nn[p] + w2f * out_nt[p] / np.float32(h * w)
                    continue
                # 2x2 stride-2 average pool into the next stage: offset d feeds e = d/2 (rows 2p and 2p+1)
                # when d is even, and e = (d-1)/2 (row 2p) and e = (d+1)/2 (row 2p+1) when d is odd.
                o = buf_off[k + 1]
                for ty in range(2):
                    ey, r0, r1 = _pool_span(dy, ty, y0, y1, hn)
                    if ey < -ey_max or ey > ey_max:
                        continue
                    for tx in range(2):
                        ex, c0, c1 = _pool_span(dx, tx, x0, x1, wn)
                        if ex < -ex_max or ex > ex_max:
                            continue
                        for r in range(r0, r1):
                            base = o + (((ey + ey_max) * hn + r) * nwe + (ex + ex_max)) * wn
                            y = 2 * r + ty
                            for c in range(c0, c1):
                                x = 2 * c + tx
                                for p in range(n_p):
                                    bufs[0, base + c, p] += q16 * sn[y, x, p]
                                    bufs[1, base + c, p] += q16 * st[y, x, p]


@njit(cache=True, parallel=True)
def pairs_cpu(x1: np.ndarray, x2: np.ndarray, maps1: np.ndarray, maps2: np.ndarray, ii: np.ndarray,
              jj: np.ndarray, stage_ops: np.ndarray, dims: np.ndarray, map_off: np.ndarray, buf_off: np.ndarray,
              w2: float, b2: float, ntk: bool, n_threads: int, width: int) -> tuple:
    """Kernel of pairs ``(x1[ii[p]], x2[jj[p]])``: images (n, C, H, W) float32, maps (n, 2, total); ``width``
    pairs at a time per thread. Returns ``(nngp, ntk)`` float32 arrays of shape (P,)."""
    n_pairs = ii.shape[0]
    out_nn = np.empty(n_pairs, np.float32)
    out_nt = np.empty(n_pairs, np.float32)
    c_in, h, w = x1.shape[1], x1.shape[2], x1.shape[3]
    total = maps1.shape[2]
    n_batches = (n_pairs + width - 1) // width
    for t in prange(n_threads):
        bufs = np.zeros((2, max(1, buf_off[-1]), width), np.float32)
        sn = np.zeros((h, w, width), np.float32)
        st = np.zeros((h, w, width), np.float32)
        tmp = np.zeros((h, w, width), np.float32)
        a = np.empty((c_in, h, w, width), np.float32)
        b = np.empty((c_in, h, w, width), np.float32)
        m1 = np.empty((2, total, width), np.float32)
        m2 = np.empty((2, total, width), np.float32)
        o_nn = np.empty(width, np.float32)
        o_nt = np.empty(width, np.float32)
        for bi in range(t, n_batches, n_threads):
            for p in range(width):
                q = min(bi * width + p, n_pairs - 1)
                i, j = ii[q], jj[q]
                a[:, :, :, p] = x1[i]
                b[:, :, :, p] = x2[j]
                m1[:, :, p] = maps1[i]
                m2[:, :, p] = maps2[j]
            _pairs_batch(a, b, m1, m2, stage_ops, dims, map_off, w2, b2, ntk, bufs, buf_off, sn, st, tmp,
                         o_nn, o_nt)
            for p in range(width):
                q = bi * width + p
                if q < n_pairs:
                    out_nn[q] = o_nn[p]
                    out_nt[q] = o_nt[p]
    return out_nn, out_nt


def stage_plan(ops: tuple[str, ...], h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The compiled kernel's program: ``(stage_ops, dims, map_off, buf_off)``.

    Stages are the op runs between pools; ``dims[k] = (H, W, Dy, Dx)`` with the band each stage needs, traced
    back from the Flatten readout (offset 0) through the pools (``D = min(2 D' + 1, side - 1)``).
    """
    stages: list[list[int]] = [[]]
    sizes = [(h, w)]
    for op in ops:
        if op == "pool":
            stages.append([])
            sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
        else:
            stages[-1].append(OP_CONV if op == "conv" else OP_ACT)
    bands = [(0, 0)] * len(stages)
    for k in range(len(stages) - 2, -1, -1):
        dy, dx = bands[k + 1]
        bands[k] = (min(2 * dy + 1, sizes[k][0] - 1), min(2 * dx + 1, sizes[k][1] - 1))
    width = max(1, max(len(s) for s in stages))
    stage_ops = np.full((len(stages), width), -1, np.int64)
    for k, s in enumerate(stages):
        stage_ops[k, : len(s)] = s
    dims = np.array([(*sizes[k], *bands[k]) for k in range(len(stages))], np.int64)
    map_off, total = [], 0
    for k, s in enumerate(stages):
        for op in s:
            if op == OP_ACT:
                map_off.append(total)
                total += sizes[k][0] * sizes[k][1]
    buf_off = [0]
    for k in range(len(stages)):
        hk, wk, dy, dx = dims[k]
        buf_off.append(buf_off[-1] + (0 if k == 0 else (2 * dy + 1) * hk * (2 * dx + 1) * wk))
    return stage_ops, dims, np.array(map_off + [total], np.int64), np.array(buf_off, np.int64)


def variance_maps(variances: list[np.ndarray]) -> np.ndarray:
    """Per-image ``(n, 2, total)``: sqrt(v) and 1/sqrt(v) (0 where v = 0) of every activation, flattened."""
    v = np.concatenate([np.asarray(a, np.float32).reshape(a.shape[0], -1) for a in variances], axis=1)
    q = np.sqrt(np.maximum(v, 0.0))
    r = np.where(q > 0, 1.0 / np.where(q > 0, q, 1.0), 0.0).astype(np.float32)
    return np.ascontiguousarray(np.stack([q, r], axis=1), np.float32)


def gram_pairs(ops: tuple[str, ...], w_std: float, b_std: float, ntk: bool, x1: np.ndarray, x2: np.ndarray,
               maps1: np.ndarray, maps2: np.ndarray, ii: np.ndarray, jj: np.ndarray, width: int = WIDTH
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(nngp, ntk)`` of pairs ``(x1[ii], x2[jj])``: images (n, H, W, C), maps from :func:`variance_maps`."""
    h, w = x1.shape[1], x1.shape[2]
    stage_ops, dims, map_off, buf_off = stage_plan(ops, h, w)
    t1 = np.ascontiguousarray(np.transpose(np.asarray(x1, np.float32), (0, 3, 1, 2)))
    t2 = t1 if x2 is x1 else np.ascontiguousarray(np.transpose(np.asarray(x2, np.float32), (0, 3, 1, 2)))
    return pairs_cpu(t1, t2, maps1, maps2, np.asarray(ii, np.int64), np.asarray(jj, np.int64), stage_ops, dims,
                     map_off, buf_off, float(w_std) ** 2, float(b_std) ** 2, bool(ntk),
                     numba.get_num_threads(), width)
