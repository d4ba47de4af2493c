"""Adversarial attacks (PGD) on kernel-regression predictors, in pixel space.

A predictor maps model inputs (n, H, W, C) to scores (n, C) — e.g. ``K(x, X_s) (K_ss + lam I)^-1 y_s``.
Attacks perturb *pixels*: the perturbed image is clipped to the valid pixel range [0, 1] and then mapped
through the dataset's preprocessing (the store's affine map), so ``linf:8/255`` means what readers expect.
Gradients flow through the analytic neural-tangents kernel (JAX).

The loss maximised is the margin ``max_{j != y} f_j(x) - f_y(x)`` (Carlini-Wagner style), which suits
regression-trained predictors better than cross-entropy; an example counts as robust when every restart
leaves its argmax correct.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

#: f(inputs (n, H, W, C)) -> scores (n, C), differentiable in JAX.
Predictor = Callable[[Any], Any]


@dataclass(frozen=True)
class Attack:
    """PGD on an ``linf`` or ``l2`` ball of radius ``eps`` (pixel units, pixels in [0, 1])."""

    norm: str
    eps: float
    steps: int = 20
    step_size: float | None = None  # default 2.5 * eps / steps (Madry et al.)
    random_start: bool = True
    restarts: int = 1

    @classmethod
    def parse(cls, text: str, steps: int = 20, restarts: int = 1) -> "Attack":
        """``linf:EPS`` or ``l2:EPS``; EPS may be a fraction such as ``8/255``."""
        norm, _, raw = text.partition(":")
        if norm not in ("linf", "l2") or not raw:
            raise InputError(f"--attack must be linf:EPS or l2:EPS (e.g. linf:8/255), got {text!r}")
        try:
            eps = float(Fraction(raw)) if "/" in raw else float(raw)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"--attack {text!r}: EPS must be a number or a fraction like 8/255") from None
        if eps < 0:
            raise InputError(f"--attack {text!r}: EPS must be >= 0")
        if steps < 1 or restarts < 1:
            raise InputError("--pgd-steps and --restarts must be >= 1")
        return cls(norm, eps, steps, None, True, restarts)

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def describe(self) -> str:
        return f"{self.norm}:{self.eps:g} x{self.steps} steps, {self.restarts} restart(s)"


def _project(delta: Any, attack: Attack) -> Any:
    import jax.numpy as jnp  # noqa: PLC0415

    if attack.norm == "linf":
        return jnp.clip(delta, -attack.eps, attack.eps)
    flat = delta.reshape(delta.shape[0], -1)
    norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
    scale = jnp.minimum(1.0, attack.eps / jnp.maximum(norms, 1e-12))
    return (flat * scale).reshape(delta.shape)


def _random_start(key: Any, shape: tuple[int, ...], attack: Attack) -> Any:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    if attack.norm == "linf":
        return jax.random.uniform(key, shape, minval=-attack.eps, maxval=attack.eps)
    k1, k2 = jax.random.split(key)
    d = jax.random.normal(k1, shape).reshape(shape[0], -1)
    d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
    r = jax.random.uniform(k2, (shape[0], 1)) ** (1.0 / d.shape[1])
    return (d * r * attack.eps).reshape(shape)


def margin(scores: Any, labels: Any) -> Any:
    """``max_{j != y} s_j - s_y`` per row (> 0 means misclassified)."""
    import jax.numpy as jnp  # noqa: PLC0415

    n, c = scores.shape
    true = scores[jnp.arange(n), labels]
    others = jnp.where(jnp.arange(c)[None, :] == labels[:, None], -jnp.inf, scores)
    return others.max(axis=1) - true


def pgd(predict: Predictor, to_inputs: Callable[[Any], Any], pixels: np.ndarray, labels: np.ndarray,
        attack: Attack, seed: int = 0) -> np.ndarray:
    """Adversarial pixels (n, H, W, C) in [0, 1] maximising the margin, over ``attack.restarts`` restarts.

    ``to_inputs`` maps pixels to model inputs (the store's preprocessing; identity for raw pixels).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    x0 = jnp.asarray(pixels, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    if attack.eps == 0:
        return np.asarray(x0)

    def objective(delta: Any) -> Any:
        adv = jnp.clip(x0 + delta, 0.0, 1.0)
        m = margin(predict(to_inputs(adv)), y)
        return m.sum(), m

    grad_fn = jax.jit(jax.grad(objective, has_aux=True))
    score_fn = jax.jit(lambda d: objective(d)[1])

    def step(delta: Any) -> Any:
        g, _ = grad_fn(delta)
        if attack.norm == "linf":
            move = jnp.sign(g)
        else:
            flat = g.reshape(g.shape[0], -1)
            move = (flat / jnp.maximum(jnp.linalg.norm(flat, axis=1, keepdims=True), 1e-12)).reshape(g.shape)
        delta = _project(delta + attack.alpha * move, attack)
        return jnp.clip(x0 + delta, 0.0, 1.0) - x0  # stay inside the pixel range

    best = jnp.zeros_like(x0)
    best_margin = score_fn(best)
    key = jax.random.PRNGKey(seed)
    for _ in range(attack.restarts):
        key, sub = jax.random.split(key)
        delta = _random_start(sub, x0.shape, attack) if attack.random_start else jnp.zeros_like(x0)
        delta = jnp.clip(x0 + delta, 0.0, 1.0) - x0
        for _ in range(attack.steps):
            delta = step(delta)
        m = score_fn(delta)
        better = m > best_margin
        best = jnp.where(better[:, None, None, None], delta, best)
        best_margin = jnp.maximum(m, best_margin)
    return np.asarray(jnp.clip(x0 + best, 0.0, 1.0))


def random_noise(pixels: np.ndarray, attack: Attack, seed: int = 0) -> np.ndarray:
    """Pixels plus random noise on the surface of the attack's ball (a baseline PGD must beat)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    key = jax.random.PRNGKey(seed)
    shape = pixels.shape
    if attack.norm == "linf":
        delta = attack.eps * jnp.sign(jax.random.normal(key, shape))
    else:
        d = jax.random.normal(key, shape).reshape(shape[0], -1)
        delta = (attack.eps * d / jnp.linalg.norm(d, axis=1, keepdims=True)).reshape(shape)
    return np.asarray(jnp.clip(jnp.asarray(pixels) + delta, 0.0, 1.0))


def robust_accuracy(predict: Predictor, to_inputs: Callable[[Any], Any], pixels: np.ndarray, labels: np.ndarray,
                    attack: Attack, *, batch: int = 256, seed: int = 0) -> dict[str, float]:
    """Clean accuracy, PGD robust accuracy and same-norm random-noise accuracy, in batches."""
    import jax.numpy as jnp  # noqa: PLC0415

    clean = robust = noisy = 0
    for start in range(0, len(pixels), batch):
        p, y = pixels[start : start + batch], labels[start : start + batch]
        clean += int(np.sum(np.asarray(predict(to_inputs(jnp.asarray(p)))).argmax(1) == y))
        adv = pgd(predict, to_inputs, p, y, attack, seed=seed + start)
        robust += int(np.sum(np.asarray(predict(to_inputs(jnp.asarray(adv)))).argmax(1) == y))
        rnd = random_noise(p, attack, seed=seed + start)
        noisy += int(np.sum(np.asarray(predict(to_inputs(jnp.asarray(rnd)))).argmax(1) == y))
    n = max(1, len(pixels))
    return {"accuracy": clean / n, "robust_accuracy": robust / n, "noise_accuracy": noisy / n}
