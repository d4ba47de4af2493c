"""Exact NNGP/NTK recursion of fully-connected networks: ``depth`` x [Dense, activation] + Dense readout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from kernelscale.kernels.native._arccos import ACTIVATIONS


@dataclass(frozen=True)
class FCNet:
    """``depth`` hidden Dense layers with ``activation`` (relu or erf), NTK parameterisation."""

    depth: int
    w_std: float
    b_std: float
    activation: str = "relu"
    ntk: bool = True

    def self_pairs(self, f: Any) -> tuple[Any, Any, list[Any]]:
        """Each flattened input ``(n, d)`` with itself: ``(nngp (n,), ntk (n,), pre-activation variances)``."""
        act = ACTIVATIONS[self.activation]
        w2, b2 = self.w_std**2, self.b_std**2
        nngp = w2 * jnp.sum(f * f, axis=1) / f.shape[1] + b2
        ntk, variances = nngp, []
        for _ in range(self.depth):
            variances.append(nngp)
            act_nngp, dot = act(nngp, nngp, nngp)
            nngp = w2 * act_nngp + b2
            ntk = nngp + w2 * ntk * dot
        return nngp, ntk, variances

    def block(self, x1: Any, x2: Any | None) -> tuple[Any, Any]:
        """``(nngp, ntk)`` of every pair, ``(n1, n2)``; ``x2=None``: x1 with itself, whose diagonal comes from
        :meth:`self_pairs` (correlation exactly 1, so no rounding reaches the arc-cosine's square root)."""
        act = ACTIVATIONS[self.activation]
        w2, b2 = self.w_std**2, self.b_std**2
        f1 = x1.reshape(x1.shape[0], -1)
        f2 = f1 if x2 is None else x2.reshape(x2.shape[0], -1)
        self1 = self.self_pairs(f1)
        self2 = self1 if x2 is None else self.self_pairs(f2)
        cov = jnp.matmul(f1, f2.T, precision="highest")  # full float32 products on GPUs too (no TF32)
        if x2 is None:  # exactly symmetric: the upper triangle mirrored
            cov = jnp.triu(cov) + jnp.triu(cov, 1).T
        nngp = w2 * cov / f1.shape[1] + b2
        ntk = nngp
        for v1, v2 in zip(self1[2], self2[2]):
            act_nngp, dot = act(nngp, v1[:, None], v2[None, :])
            nngp = w2 * act_nngp + b2
            ntk = nngp + w2 * ntk * dot
        if x2 is None:
            eye = jnp.eye(nngp.shape[0], dtype=bool)
            nngp = jnp.where(eye, self1[0][:, None], nngp)
            ntk = jnp.where(eye, self1[1][:, None], ntk)
        return nngp, ntk
