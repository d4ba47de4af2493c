"""Arc-cosine (ReLU) and erf kernel terms, without the cancellation at correlation 1.

For a ReLU layer with input covariance ``c`` between two positions of variances ``v1`` and ``v2``:

    g = sqrt(v1 v2),  rho = c / g,  theta = arccos(rho)
    nngp' = g (sin(theta) + (pi - theta) rho) / (2 pi),   dot = (pi - theta) / (2 pi)

``dot`` (the NTK factor) has an infinite derivative at rho = 1, so any rounding of ``rho`` below 1 on a self-pair
becomes an error of sqrt(2 eps) in the NTK: the 1e-3 relative error of the usual ``sqrt(v1 v2 - c^2)`` form.
Here ``rho`` is rounded to exactly 1 when it is within 4 ulp of 1, below the rounding of
``c / sqrt(v1 v2)`` itself: whenever ``c``, ``v1`` and ``v2`` are equal in exact arithmetic (a position with
itself, constant image regions, equal inputs met in different blocks) ``theta`` is exactly 0; pairs that
rounding pushes past +-1 are clamped. Gradients follow neural-tangents: zero
derivative of ``dot`` where ``sin(theta) = 0``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PI = float(np.pi)
TWO_PI = 2.0 * PI


def _asin_poly(z: Any, w: Any) -> Any:
    """asin(w) for w in [0, 0.5] given z = w * w (Cephes asinf: ~2.5e-7 relative in float32)."""
    p = (((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2) * z
    return (p + 1.6666752422e-1) * z * w + w


def _acos_and_sin(rho: Any) -> tuple[Any, Any]:
    """(arccos(rho), sqrt(1 - rho^2)) for rho in [-1, 1]; a polynomial in float32, ``jnp.arccos`` otherwise."""
    sin = jnp.sqrt((1.0 - rho) * (1.0 + rho))
    if rho.dtype != jnp.float32:
        return jnp.arccos(rho), sin
    a = jnp.abs(rho)
    big = a > 0.5
    z = jnp.where(big, 0.5 * (1.0 - a), a * a)  # 1 - a is exact for a in [0.5, 1]
    w = jnp.where(big, jnp.sqrt(z), a)
    s = _asin_poly(z, w)
    acos_a = jnp.where(big, 2.0 * s, PI / 2 - s)
    return jnp.where(rho < 0, PI - acos_a, acos_a), sin


def _snap(rho: Any) -> Any:
    """rho clamped to [-1, 1], and 1 when within 4 ulp of it: below the rounding of ``c / sqrt(v1 v2)``, so a
    pair of equal inputs (correlation 1 in exact arithmetic) is never turned into one with theta ~ sqrt(eps)."""
    r = jnp.clip(rho, -1.0, 1.0)
    return jnp.where(r > 1.0 - 4 * jnp.finfo(r.dtype).eps, 1.0, r)


def _relu_j_impl(rho: Any) -> tuple[Any, Any]:
    r = _snap(rho)
    theta, sin = _acos_and_sin(r)
    return (sin + (PI - theta) * r) / TWO_PI, (PI - theta) / TWO_PI


@jax.custom_jvp
def relu_j(rho: Any) -> tuple[Any, Any]:
    """(J(rho), J'(rho)): the normalised ReLU kernel and its derivative, the NTK factor ``dot``."""
    return _relu_j_impl(rho)


@relu_j.defjvp
def _relu_j_jvp(primals: Any, tangents: Any) -> Any:
    (rho,), (rho_dot,) = primals, tangents
    j, dot = _relu_j_impl(rho)
    r = _snap(rho)
    sin = jnp.sqrt((1.0 - r) * (1.0 + r))
    d_dot = jnp.where(sin > 0, 1.0 / (TWO_PI * jnp.where(sin > 0, sin, 1.0)), 0.0)
    return (j, dot), (dot * rho_dot, d_dot * rho_dot)


@jax.custom_jvp
def safe_sqrt(x: Any) -> Any:
    """sqrt(max(x, 0)) with a zero derivative at 0 (as neural-tangents' ``_sqrt``)."""
    return jnp.sqrt(jnp.maximum(x, 0.0))


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals: Any, tangents: Any) -> Any:
    (x,), (x_dot,) = primals, tangents
    root = jnp.sqrt(jnp.maximum(x, 0.0))
    return root, jnp.where(root > 0, x_dot / (2.0 * jnp.where(root > 0, root, 1.0)), 0.0)


def _root_and_inverse(var: Any) -> tuple[Any, Any]:
    """(sqrt(v), 1/sqrt(v)), both 0 where v <= 0 (zero derivatives there)."""
    root = safe_sqrt(var)
    return root, jnp.where(root > 0, 1.0 / jnp.where(root > 0, root, 1.0), 0.0)


def relu(cov: Any, var1: Any, var2: Any) -> tuple[Any, Any]:
    """ReLU layer on covariances: ``(nngp', dot)``, both shaped like ``cov`` (var1, var2 broadcast to it).

    Square roots are taken of the variances (per input and position, before broadcasting), so each entry
    costs multiplications only: rho = c (1/sqrt(v1)) (1/sqrt(v2)), within 3 ulp of the exact quotient and
    snapped to 1 within 4 ulp of it (a self-pair's correlation is exactly 1)."""
    root1, inv1 = _root_and_inverse(var1)
    root2, inv2 = _root_and_inverse(var2)
    j, dot = relu_j(cov * inv1 * inv2)
    return root1 * root2 * j, dot


def erf(cov: Any, var1: Any, var2: Any) -> tuple[Any, Any]:
    """erf layer (neural-tangents ``stax.Erf()``): ``(nngp', dot)``.

    nngp' = (2/pi) asin(2c / sqrt((1 + 2 v1)(1 + 2 v2))), dot = (4/pi) / sqrt((1 + 2 v1)(1 + 2 v2) - 4 c^2);
    both stay away from their singular points (the denominator is >= 1), so no special care is needed.
    """
    prod = (1.0 + 2.0 * var1) * (1.0 + 2.0 * var2)
    nngp = (2.0 / PI) * jnp.arcsin(jnp.clip(2.0 * cov / jnp.sqrt(prod), -1.0, 1.0))
    dot = (4.0 / PI) / jnp.sqrt(jnp.maximum(prod - 4.0 * cov * cov, 1e-30))
    return nngp, dot


#: activation name -> covariance map ``(cov, var1, var2) -> (nngp', dot)``; var' of a position is nngp'(v, v, v)
ACTIVATIONS = {"relu": relu, "erf": erf}
