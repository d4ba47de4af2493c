"""Exact NNGP/NTK recursions of convolutional networks (KIP's ConvNet, Myrtle) on pairs of images.

A network is a list of ops, each ``"conv"`` (3x3 SAME, ``W_std``, ``b_std``), ``"act"`` (ReLU) or ``"pool"``
(2x2 stride-2 average), ending in Flatten + Dense. :meth:`ConvNet.layers` runs it on each image with itself
(returning the per-position variances every activation needs) or on aligned pairs (a[p], b[p]) given those
variances: the same code for both; on a self-pair the variance of a position is read from the
pair's own covariance, so the arc-cosine terms see correlation exactly 1 there (exact diagonals).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kernelscale.kernels.native._arccos import relu
from kernelscale.kernels.native._layouts import BandLayout, FullLayout

MYRTLE_LAYERS = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}


@dataclass(frozen=True)
class ConvNet:
    """A conv/act/pool network's kernel: ``ops``, weight and bias standard deviations, input size."""

    ops: tuple[str, ...]
    w_std: float
    b_std: float
    h: int
    w: int
    ntk: bool = True

    @classmethod
    def convnet(cls, depth: int, w_std: float, b_std: float, h: int, w: int, ntk: bool = True) -> "ConvNet":
        """KIP's ConvNet: ``depth`` x [Conv 3x3 SAME, ReLU, AvgPool 2x2] + Flatten + Dense."""
        return cls(("conv", "act", "pool") * depth, w_std, b_std, h, w, ntk)

    @classmethod
    def myrtle(cls, depth: int, w_std: float, b_std: float, h: int, w: int, ntk: bool = True) -> "ConvNet":
        """Myrtle-5/7/10 (Shankar et al. 2020; neural-tangents' examples/myrtle)."""
        a, b, c = MYRTLE_LAYERS[depth]
        ops = ("conv", "act") * a + ("pool",) + ("conv", "act") * b + ("pool",) + ("conv", "act") * c + ("pool",) * 3
        return cls(ops, w_std, b_std, h, w, ntk)

    def layout(self) -> BandLayout | FullLayout:
        """The first stage's layout: the offsets the Flatten readout needs, traced back through the pools
        (``D_in = 2 D_out + 1`` per pool, at most the image side - 1); full when that is every offset."""
        sizes = [(self.h, self.w)]
        for op in self.ops:
            if op == "pool":
                sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
        dy = dx = 0
        stage = len(sizes) - 1
        for op in reversed(self.ops):
            if op == "pool":
                stage -= 1
                h, w = sizes[stage]
                dy, dx = min(2 * dy + 1, h - 1), min(2 * dx + 1, w - 1)
        if dy >= self.h - 1 and dx >= self.w - 1:
            return FullLayout(self.h, self.w)
        return BandLayout(self.h, self.w, dy, dx)

    def layers(self, a: Any, b: Any, var_a: list[Any] | None, var_b: list[Any] | None
               ) -> tuple[Any, Any, list[Any]]:
        """Run the network on aligned pairs ``(a[p], b[p])``, images ``(P, H, W, C)``.

        ``var_a``/``var_b``: the per-activation variance maps of a and b from a self-pair run, or None for
        self-pairs (a is b), which read them off their own covariance. Returns ``(nngp, ntk, variances)``,
        ``(P,)`` each (ntk is None for an NNGP-only network) and the variance maps met on the way.
        """
        lay = self.layout()
        w2, b2 = self.w_std**2, self.b_std**2
        nngp = ntk = None
        variances: list[Any] = []
        for op in self.ops:
            if op == "conv":
                conv_nngp = lay.first_conv(a, b) if nngp is None else lay.conv(nngp)
                prev_ntk = ntk
                nngp = w2 * conv_nngp + b2
                if self.ntk:
                    ntk = nngp if prev_ntk is None else nngp + w2 * lay.conv(prev_ntk)
            elif op == "act":
                k = len(variances)
                v1 = lay.variance(nngp) if var_a is None else var_a[k]
                v2 = v1 if var_b is None else var_b[k]
                variances.append(v1)
                nngp, dot = relu(nngp, *lay.pair_variances(v1, v2))
                nngp = lay.mask(nngp)
                if self.ntk:
                    ntk = lay.mask(ntk * dot)
            elif op == "pool":
                nngp, nxt = lay.pool(nngp)
                if self.ntk:
                    ntk, _ = lay.pool(ntk)
                lay = nxt
        out_nngp = w2 * lay.readout(nngp) + b2
        out_ntk = out_nngp + w2 * lay.readout(ntk) if self.ntk else None
        return out_nngp, out_ntk, variances

    def entries_per_pair(self) -> int:
        """Covariance entries of the first (largest) stage per pair: what one pair costs in memory."""
        lay = self.layout()
        if isinstance(lay, FullLayout):
            return (lay.h * lay.w) ** 2
        return (2 * lay.dy + 1) * lay.h * (2 * lay.dx + 1) * lay.w

