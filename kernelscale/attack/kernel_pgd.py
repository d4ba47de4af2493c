"""Adversarial attacks (PGD) on kernel-regression predictors, in pixel space.

A predictor maps model inputs (n, H, W, C) to scores (n, C) — e.g. ``K(x, X_s) (K_ss + lam I)^-1 y_s``.
Attacks perturb *pixels*: the perturbed image is clipped to the valid pixel range [0, 1] and then mapped
through the dataset's preprocessing (the store's affine map), so ``linf:8/255`` means what readers expect.
Gradients flow through the analytic neural-tangents kernel (JAX).

The loss maximised is the margin ``max_{j != y} f_j(x) - f_y(x)`` (Carlini-Wagner style), which suits
regression-trained predictors better than cross-entropy; an example counts as robust when every restart
leaves its argmax correct.

Three entry points:

* :func:`pgd` — eager PGD over batches with restarts, for any JAX-differentiable predictor or a
  :class:`KernelPredictor` (a full-data model: the kernel against all N training rows is evaluated, and
  differentiated, in chunks of training rows so memory stays bounded);
* :func:`pgd_traceable` — one PGD run that can be traced inside ``jax.jit`` (adversarial KIP), with one
  PRNG key per row, so the result does not depend on how a batch is split;
* :func:`attack_rows` / :func:`robust_accuracy` — clean / PGD / random-noise correctness per row, in batches
  whose seeds derive from their global row offset (a slice attacked elsewhere gives the same answer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from kernelscale.errors import InputError

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
    def parse(cls, text: str, steps: int = 20, restarts: int = 1, step_size: float | None = None) -> "Attack":
        """``linf:EPS`` or ``l2:EPS``; EPS may be a fraction such as ``8/255``."""
        norm, _, raw = str(text).partition(":")
        if norm not in ("linf", "l2") or not raw:
            raise InputError(f"--attack must be linf:EPS or l2:EPS (e.g. linf:8/255), got {text!r}")
        try:
            eps = float(Fraction(raw)) if "/" in raw else float(raw)
        except (ValueError, ZeroDivisionError):
            raise InputError(f"--attack {text!r}: EPS must be a number or a fraction like 8/255") from None
        if not eps >= 0 or not np.isfinite(eps):
            raise InputError(f"--attack {text!r}: EPS must be a finite number >= 0")
        if steps < 1 or restarts < 1:
            raise InputError("--pgd-steps and --restarts must be >= 1")
        if step_size is not None and not step_size > 0:
            raise InputError(f"--step-size must be > 0, got {step_size}")
        return cls(norm, eps, steps, step_size, True, restarts)

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def describe(self) -> str:
        return f"{self.norm}:{self.eps:g} x{self.steps} steps, {self.restarts} restart(s)"

    def to_json(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps, "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start, "restarts": self.restarts}


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


def _ascent(delta: Any, grad: Any, x0: Any, attack: Attack) -> Any:
    """One PGD step: move along sign(g) (linf) or g/||g|| (l2), project on the ball and the pixel range."""
    import jax.numpy as jnp  # noqa: PLC0415

    if attack.norm == "linf":
        move = jnp.sign(grad)
    else:
        flat = grad.reshape(grad.shape[0], -1)
        move = (flat / jnp.maximum(jnp.linalg.norm(flat, axis=1, keepdims=True), 1e-12)).reshape(grad.shape)
    delta = _project(delta + attack.alpha * move, attack)
    return jnp.clip(x0 + delta, 0.0, 1.0) - x0


# ----------------------------------------------------------------------------------------------------------
# Kernel-regression predictor with bounded memory
# ----------------------------------------------------------------------------------------------------------


class KernelPredictor:
    """``f(x) = K(x, X) @ W`` for N rows X (N, *shape) and weights W (N, C), evaluated in chunks of X rows.

    ``margin_and_grad`` returns the margin and its gradient w.r.t. x by an explicit vector-Jacobian product
    per chunk, so the memory of an attack step is that of one (batch x chunk) kernel block, whatever N is.
    The last chunk is padded with copies of a real row and zero weights (no effect on the result).
    """

    def __init__(self, kernel: Callable[[Any, Any], Any], x_train: np.ndarray, weights: np.ndarray, chunk: int = 4096):
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415

        x_train = np.asarray(x_train, np.float32)
        weights = np.asarray(weights, np.float32)
        if len(x_train) != len(weights) or len(x_train) == 0:
            raise InputError(f"predictor: {len(x_train)} training rows but {len(weights)} weight rows")
        n = len(x_train)
        chunk = max(1, min(int(chunk), n))
        pad = (-n) % chunk
        if pad:
            x_train = np.concatenate([x_train, np.repeat(x_train[:1], pad, axis=0)])
            weights = np.concatenate([weights, np.zeros((pad, weights.shape[1]), np.float32)])
        self.n, self.chunk, self.num_classes = n, chunk, weights.shape[1]
        self.chunks = [(jnp.asarray(x_train[s : s + chunk]), jnp.asarray(weights[s : s + chunk]))
                       for s in range(0, len(x_train), chunk)]

        def block(x: Any, xc: Any, wc: Any) -> Any:
            return kernel(x, xc) @ wc

        def block_vjp(x: Any, xc: Any, wc: Any, cot: Any) -> Any:
            _, back = jax.vjp(lambda z: block(z, xc, wc), x)
            return back(cot)[0]

        self._block = jax.jit(block)
        self._block_vjp = jax.jit(block_vjp)
        self._margin_grad = jax.jit(jax.value_and_grad(lambda s, y: margin(s, y).sum()))
        self._margin = jax.jit(margin)

    def __call__(self, x: Any) -> Any:
        """Scores (n, C) of inputs x (n, *shape)."""
        import jax.numpy as jnp  # noqa: PLC0415

        x = jnp.asarray(x, jnp.float32)
        total = self._block(x, *self.chunks[0])
        for xc, wc in self.chunks[1:]:
            total = total + self._block(x, xc, wc)
        return total

    def margin_and_grad(self, x: Any, labels: Any) -> tuple[Any, Any]:
        """(margin per row (n,), d sum(margin) / dx (n, *shape))."""
        import jax.numpy as jnp  # noqa: PLC0415

        x = jnp.asarray(x, jnp.float32)
        scores = self(x)
        _, cot = self._margin_grad(scores, labels)
        grad = self._block_vjp(x, *self.chunks[0], cot)
        for xc, wc in self.chunks[1:]:
            grad = grad + self._block_vjp(x, xc, wc, cot)
        return self._margin(scores, labels), grad


# ----------------------------------------------------------------------------------------------------------
# PGD
# ----------------------------------------------------------------------------------------------------------


def pgd(predict: Predictor, to_inputs: Callable[[Any], Any], pixels: np.ndarray, labels: np.ndarray,
        attack: Attack, seed: int = 0) -> np.ndarray:
    """Adversarial pixels (n, H, W, C) in [0, 1] maximising the margin, over ``attack.restarts`` restarts.

    ``to_inputs`` maps pixels to model inputs (the store's preprocessing; identity for raw pixels).
    ``predict`` is a JAX-differentiable function or a :class:`KernelPredictor` (chunked gradients).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    x0 = jnp.asarray(pixels, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    if attack.eps == 0:
        return np.asarray(x0)

    def inputs_of(delta: Any) -> Any:
        return to_inputs(jnp.clip(x0 + delta, 0.0, 1.0))

    if isinstance(predict, KernelPredictor):
        def margin_and_grad(delta: Any) -> tuple[Any, Any]:
            inputs, back = jax.vjp(inputs_of, delta)
            m, g_in = predict.margin_and_grad(inputs, y)
            return m, back(g_in)[0]

        def score_fn(delta: Any) -> Any:
            return margin(predict(inputs_of(delta)), y)
    else:
        def objective(delta: Any) -> Any:
            m = margin(predict(inputs_of(delta)), y)
            return m.sum(), m

        grad_fn = jax.jit(jax.grad(objective, has_aux=True))

        def margin_and_grad(delta: Any) -> tuple[Any, Any]:
            g, m = grad_fn(delta)
            return m, g

        score_fn = jax.jit(lambda d: objective(d)[1])

    best = jnp.zeros_like(x0)
    best_margin = score_fn(best)
    key = jax.random.PRNGKey(seed)
    for _ in range(attack.restarts):
        key, sub = jax.random.split(key)
        delta = _random_start(sub, x0.shape, attack) if attack.random_start else jnp.zeros_like(x0)
        delta = jnp.clip(x0 + delta, 0.0, 1.0) - x0
        for _ in range(attack.steps):
            _, g = margin_and_grad(delta)
            delta = _ascent(delta, g, x0, attack)
        m = score_fn(delta)
        better = m > best_margin
        best = jnp.where(better.reshape((-1,) + (1,) * (x0.ndim - 1)), delta, best)
        best_margin = jnp.maximum(m, best_margin)
    return np.asarray(jnp.clip(x0 + best, 0.0, 1.0))


def row_keys(key: Any, rows: Any) -> Any:
    """One PRNG key per row, folded from ``key`` and a hash of the row's float bits.

    The hash is a wrapping uint32 sum (order independent), so a row gets the same key in any batch or shard.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    flat = rows.reshape(rows.shape[0], -1).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)
    mult = (jnp.arange(flat.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761)) | jnp.uint32(1)
    h = jnp.sum(bits * mult, axis=1, dtype=jnp.uint32)
    return jax.vmap(lambda v: jax.random.fold_in(key, v))(h)


def pgd_traceable(predict: Predictor, to_inputs: Callable[[Any], Any], pixels: Any, labels: Any, attack: Attack,
                  keys: Any) -> Any:
    """One PGD run (no restarts) as pure JAX (usable inside ``jax.jit``); ``keys`` (n, 2): one key per row.

    Returns adversarial pixels (n, H, W, C) in [0, 1]. Each row's random start depends only on its key.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    x0 = jnp.asarray(pixels, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    if attack.eps == 0:
        return x0

    def objective(delta: Any) -> Any:
        return margin(predict(to_inputs(jnp.clip(x0 + delta, 0.0, 1.0))), y).sum()

    if attack.random_start:
        row_shape = (1, *x0.shape[1:])
        delta = jax.vmap(lambda k: _random_start(k, row_shape, attack)[0])(keys)
        delta = jnp.clip(x0 + delta, 0.0, 1.0) - x0
    else:
        delta = jnp.zeros_like(x0)
    grad = jax.grad(objective)
    delta = jax.lax.fori_loop(0, attack.steps, lambda _, d: _ascent(d, grad(d), x0, attack), delta)
    return jnp.clip(x0 + delta, 0.0, 1.0)


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


def attack_rows(predict: Predictor, to_inputs: Callable[[Any], Any], pixels: np.ndarray, labels: np.ndarray,
                attack: Attack, *, batch: int = 256, seed: int = 0, offset: int = 0) -> dict[str, np.ndarray]:
    """Per-row correctness (bool arrays ``clean``, ``robust``, ``noise``) of rows ``offset..offset+n``.

    Batches start at multiples of ``batch`` from ``offset``; batch b's seeds are ``seed + offset + b*batch``,
    so attacking a batch-aligned slice with its global ``offset`` reproduces the whole run's rows exactly.
    """
    import jax.numpy as jnp  # noqa: PLC0415

    def correct(p: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(predict(to_inputs(jnp.asarray(p, jnp.float32)))).argmax(1) == y

    out: dict[str, list[np.ndarray]] = {"clean": [], "robust": [], "noise": []}
    for start in range(0, len(pixels), batch):
        p, y = np.asarray(pixels[start : start + batch], np.float32), np.asarray(labels[start : start + batch])
        s = seed + offset + start
        out["clean"].append(correct(p, y))
        out["robust"].append(correct(pgd(predict, to_inputs, p, y, attack, seed=s), y))
        out["noise"].append(correct(random_noise(p, attack, seed=s), y))
    return {k: np.concatenate(v) if v else np.zeros(0, bool) for k, v in out.items()}


def robust_accuracy(predict: Predictor, to_inputs: Callable[[Any], Any], pixels: np.ndarray, labels: np.ndarray,
                    attack: Attack, *, batch: int = 256, seed: int = 0) -> dict[str, float]:
    """Clean accuracy, PGD robust accuracy and same-norm random-noise accuracy, in batches."""
    rows = attack_rows(predict, to_inputs, pixels, labels, attack, batch=batch, seed=seed)
    n = max(1, len(pixels))
    return {"accuracy": float(rows["clean"].sum() / n), "robust_accuracy": float(rows["robust"].sum() / n),
            "noise_accuracy": float(rows["noise"].sum() / n)}
