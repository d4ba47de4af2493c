"""KIP (Kernel Inducing Points): the pure, optax-style distillation step.

KIP (Nguyen, Chen & Lee 2021; Nguyen, Novak, Xiao & Lee 2021) learns a small support set ``(X_s, y_s)`` such
that kernel ridge regression on it predicts a large target set. On a target batch ``(X_t, y_t)`` of ``B`` rows

    loss = 1/(2B) * sum_rows || y_t - K_ts (K_ss + lam I)^-1 y_s ||^2,   lam = reg * trace(K_ss) / n_s

i.e. half the squared error per target row, averaged over the batch (summed over the C label columns). ``lam``
follows neural-tangents' convention (reg scaled by the mean diagonal of K_ss) and is differentiated through.
The support inputs (and, with ``learn_labels``, the support labels) are optimised with optax Adam; the
gradient flows through the analytic neural-tangents kernel.

Usage (optax style)::

    kip = make_kip(kernel, lr=0.01, reg=1e-6, learn_labels=True, label_lr=0.01, schedule="cosine", total_steps=6000)
    state = kip.init(support_x, support_y, seed=0)
    state, metrics = kip.update(state, (target_x, target_y))

``KipState`` is a pytree (a NamedTuple of arrays and optax state). For sharding, :meth:`Kip.shard_loss_and_grads`
returns the *summed* (un-normalised) loss and gradients of one slice of the batch; :meth:`Kip.apply` turns the
sums over all slices into the same update as :meth:`Kip.update`. Nothing here knows about Ray or Zarr.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import optax

from kernelscale.data.labels import one_hot
from kernelscale.linalg.ridge import ridge

log = logging.getLogger(__name__)

#: f(x1, x2) -> (n1, n2) kernel block (differentiable in both arguments), e.g. ``kernels.pairwise(spec)``
#: without the jit, or ``lambda a, b: kernel_fn(a, b, "ntk")``.
PairKernel = Callable[[Any, Any], Any]
#: Optional hook run on each target batch before the loss: f(state, target_x, target_y) -> (target_x, target_y).
#: Adversarial KIP replaces the batch by PGD examples against the current support predictor here.
TargetTransform = Callable[["KipState", Any, Any], tuple[Any, Any]]


class KipState(NamedTuple):
    """Everything a KIP run carries from step to step (a pytree).

    x: (n_s, *input_shape) float32 support inputs; y: (n_s, C) float32 support labels;
    opt_state: optax Adam state over ``{"x": x, "y": y}``; key: jax PRNG key (uint32 (2,)); step: int32 scalar.
    """

    x: jax.Array
    y: jax.Array
    opt_state: Any
    key: jax.Array
    step: jax.Array


SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(base: float, schedule: str, total_steps: int | None) -> optax.Schedule | float:
    """Adam step size as a function of the step: ``constant``, or ``cosine``/``linear`` decay from ``base`` to 0
    over ``total_steps`` (held at 0 afterwards). The schedule reads the optimiser's own step count, so a
    checkpointed optimiser state resumes on the same curve."""
    if schedule == "constant":
        return base
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not total_steps or total_steps < 1:
        raise ValueError(f"the {schedule} schedule needs total_steps >= 1, got {total_steps}")
    if schedule == "cosine":
        return optax.cosine_decay_schedule(base, total_steps, alpha=0.0)
    return optax.linear_schedule(base, 0.0, total_steps)


def make_optimizer(lr: float, label_lr: float, schedule: str, total_steps: int | None) -> optax.GradientTransformation:
    """Adam over ``{"x": support, "y": labels}`` with its own step size for each (same schedule shape)."""
    return optax.multi_transform(
        {"x": optax.adam(learning_rate(lr, schedule, total_steps)),
         "y": optax.adam(learning_rate(label_lr, schedule, total_steps))},
        {"x": "x", "y": "y"})


def regulariser(k_ss: jax.Array, reg: float) -> jax.Array:
    """``reg * trace(K_ss) / n_s``: the ridge added to K_ss (:func:`kernelscale.linalg.ridge.ridge`)."""
    return ridge(reg, jnp.trace(k_ss), k_ss.shape[0])


def regularised(k_ss: jax.Array, reg: float) -> jax.Array:
    """``K_ss + lam I`` with lam from :func:`regulariser`."""
    return k_ss + regulariser(k_ss, reg) * jnp.eye(k_ss.shape[0], dtype=k_ss.dtype)


def krr_weights(k_ss: jax.Array, y_s: jax.Array, reg: float) -> jax.Array:
    """``(K_ss + lam I)^-1 y_s`` (n_s, C), solved with LU (robust to rounding in near-singular K_ss)."""
    return jnp.linalg.solve(regularised(k_ss, reg), y_s)


def sum_loss(kernel: PairKernel, x_s: jax.Array, y_s: jax.Array, x_t: jax.Array, y_t: jax.Array, reg: float
             ) -> tuple[jax.Array, jax.Array]:
    """``(1/2 sum ||y_t - pred||^2, number of correct argmax predictions)`` on one batch (not normalised)."""
    k_ss = kernel(x_s, x_s)
    k_ts = kernel(x_t, x_s)
    pred = k_ts @ krr_weights(k_ss, y_s, reg)
    loss = 0.5 * jnp.sum((y_t - pred) ** 2)
    correct = jnp.sum(jnp.argmax(pred, axis=1) == jnp.argmax(y_t, axis=1))
    return loss, correct


class Kip:
    """A KIP optimiser bound to a kernel and hyperparameters; ``init``/``update`` are pure functions.

    kernel: differentiable f(x1, x2) -> (n1, n2); lr: Adam learning rate of the support x; label_lr: that of
    the labels y (default ``lr``); schedule/total_steps: see :func:`learning_rate`; reg: ridge (times
    trace(K_ss)/n_s); learn_labels: whether y_s is optimised; target_transform: optional batch hook (see
    :data:`TargetTransform`), applied inside :meth:`update` and :meth:`shard_loss_and_grads`.
    """

    def __init__(self, kernel: PairKernel, *, lr: float, reg: float, learn_labels: bool,
                 label_lr: float | None = None, schedule: str = "constant", total_steps: int | None = None,
                 target_transform: TargetTransform | None = None):
        self.kernel = kernel
        self.lr = float(lr)
        self.label_lr = float(lr if label_lr is None else label_lr)
        self.reg = float(reg)
        self.learn_labels = bool(learn_labels)
        self.target_transform = target_transform
        self.optimizer = make_optimizer(self.lr, self.label_lr, schedule, total_steps)
        self._grad = jax.value_and_grad(self._sum_loss, argnums=(0, 1), has_aux=True)
        self.update = jax.jit(self._update)
        self.shard_loss_and_grads = jax.jit(self._shard_loss_and_grads)
        self.apply = jax.jit(self._apply)

    # -- state ----------------------------------------------------------------------------------------
    def init(self, support_x: Any, support_y: Any, seed: int = 0) -> KipState:
        """Initial state from a support set (n_s, *shape) and its labels (n_s, C)."""
        x = jnp.asarray(support_x, jnp.float32)
        y = jnp.asarray(support_y, jnp.float32)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"support has {x.shape[0]} rows but {y.shape[0]} labels")
        opt_state = self.optimizer.init({"x": x, "y": y})
        return KipState(x, y, opt_state, jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32))

    # -- loss and gradients ---------------------------------------------------------------------------
    def _sum_loss(self, x_s: jax.Array, y_s: jax.Array, x_t: jax.Array, y_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        return sum_loss(self.kernel, x_s, y_s, x_t, y_t, self.reg)

    def _transform(self, state: KipState, x_t: jax.Array, y_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.target_transform is None:
            return x_t, y_t
        return self.target_transform(state, x_t, y_t)

    def _shard_loss_and_grads(self, state: KipState, batch: tuple[Any, Any]) -> dict[str, jax.Array]:
        """Summed loss, correct count and gradients (w.r.t. x, y) of one slice of a target batch."""
        x_t, y_t = self._transform(state, jnp.asarray(batch[0], jnp.float32), jnp.asarray(batch[1], jnp.float32))
        (loss, correct), (gx, gy) = self._grad(state.x, state.y, x_t, y_t)
        return {"loss": loss, "correct": correct, "gx": gx, "gy": gy}

    def _apply(self, state: KipState, sums: dict[str, jax.Array], count: Any) -> tuple[KipState, dict[str, jax.Array]]:
        """One Adam step from loss/gradient sums over ``count`` target rows (all shards of one batch)."""
        count = jnp.asarray(count, jnp.float32)
        grads = {"x": sums["gx"] / count, "y": sums["gy"] / count}
        if not self.learn_labels:
            grads["y"] = jnp.zeros_like(grads["y"])
        updates, opt_state = self.optimizer.update(grads, state.opt_state, {"x": state.x, "y": state.y})
        if not self.learn_labels:
            updates["y"] = jnp.zeros_like(updates["y"])
        params = optax.apply_updates({"x": state.x, "y": state.y}, updates)
        key, _ = jax.random.split(state.key)
        new = KipState(params["x"], params["y"], opt_state, key, state.step + 1)
        metrics = {"loss": sums["loss"] / count, "batch_accuracy": sums["correct"] / count,
                   "grad_norm": optax.global_norm(grads)}
        return new, metrics

    def _update(self, state: KipState, batch: tuple[Any, Any]) -> tuple[KipState, dict[str, jax.Array]]:
        """One KIP step on a whole target batch ``(x_t (B, *shape), y_t (B, C))``.

        metrics: ``loss`` (the loss *before* the step, per target row), ``batch_accuracy``, ``grad_norm``.
        """
        sums = self._shard_loss_and_grads(state, batch)
        return self._apply(state, sums, batch[0].shape[0])


def make_kip(kernel: PairKernel, *, learn_labels: bool, lr: float = 0.01, reg: float = 1e-6,
             label_lr: float | None = None, schedule: str = "constant", total_steps: int | None = None,
             target_transform: TargetTransform | None = None) -> Kip:
    """A :class:`Kip` (see the module docstring). ``learn_labels`` has no default: ``kernelscale distill``'s
    defaults (fixed labels, cosine schedule over the run) live in :class:`kernelscale.kip.run.KipConfig`; the step
    alone defaults to a constant step size, which needs no ``total_steps``."""
    return Kip(kernel, lr=lr, reg=reg, learn_labels=learn_labels, label_lr=label_lr, schedule=schedule,
               total_steps=total_steps, target_transform=target_transform)


# ----------------------------------------------------------------------------------------------------------
# Kernel regression from a support set (evaluation, label-solve floor)
# ----------------------------------------------------------------------------------------------------------


def predict_fn(kernel: PairKernel, x_s: Any, y_s: Any, reg: float) -> Callable[[Any], jax.Array]:
    """``f(x) -> K(x, X_s) (K_ss + lam I)^-1 y_s`` (jitted), for batches of ``x`` rows."""
    x_s = jnp.asarray(x_s, jnp.float32)
    weights = krr_weights(kernel(x_s, x_s), jnp.asarray(y_s, jnp.float32), reg)
    return jax.jit(lambda x: kernel(jnp.asarray(x, jnp.float32), x_s) @ weights)


def score(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Sums for accuracy and mse of predictions (n, C) against integer labels (centred one-hot targets)."""
    target = one_hot(labels, num_classes)
    return {"correct": float(np.sum(np.argmax(pred, axis=1) == labels)),
            "sq_error": float(np.sum((np.asarray(pred, np.float64) - target) ** 2)), "n": float(len(labels))}


def solve_labels(k_train_s: np.ndarray, y_train: np.ndarray, k_ss: np.ndarray, reg: float) -> np.ndarray:
    """Support labels minimising ``||Y - K_train,s (K_ss + lam I)^-1 y_s||^2`` (closed form, float64).

    With ``w = (K_ss + lam I)^-1 y_s`` the problem is least squares in ``w``; then ``y_s = (K_ss + lam I) w``.
    """
    k_ts = np.asarray(k_train_s, np.float64)
    k_ss = np.asarray(k_ss, np.float64)
    w, *_ = np.linalg.lstsq(k_ts, np.asarray(y_train, np.float64), rcond=None)
    lam = ridge(reg, np.trace(k_ss), k_ss.shape[0])
    return ((k_ss + lam * np.eye(k_ss.shape[0])) @ w).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Tile-wise K_ss (large supports): the same gradient as jax.grad of sum_loss, assembled from pieces
# ----------------------------------------------------------------------------------------------------------
#
# With A = K_ss + lam I, alpha = A^-1 y_s, r = y_t - K_ts alpha, u = K_ts^T r (summed over target shards):
#   dL/dK_ts = -r alpha^T,  dL/dA = beta alpha^T with beta = A^-1 u,  dL/dy_s = -beta,
#   dL/dK_ss = dL/dA + (reg / n_s) trace(dL/dA) I   (lam depends on trace(K_ss)).
# dL/dx_s is the vjp of each kernel block with its cotangent: K_ts per target shard, K_ss per tile.


def tile_pairs(n: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Upper-triangular tiles ``(r0, r1, c0, c1)`` (r0 <= c0) of an n x n symmetric matrix."""
    starts = list(range(0, n, tile))
    return [(a, min(n, a + tile), b, min(n, b + tile)) for i, a in enumerate(starts) for b in starts[i:]]


def kss_tile(kernel: PairKernel, x_s: Any, bounds: tuple[int, int, int, int]) -> jax.Array:
    r0, r1, c0, c1 = bounds
    a = x_s[r0:r1]
    return kernel(a, a if (r0, r1) == (c0, c1) else x_s[c0:c1])  # one array twice: a symmetric, exact diagonal


def kss_tile_vjp(kernel: PairKernel, x_s: Any, bounds: tuple[int, int, int, int], grad_kss: Any) -> jax.Array:
    """Contribution of the tile (and its mirror) of K_ss to dL/dx_s, given the full dL/dK_ss (n_s, n_s)."""
    r0, r1, c0, c1 = bounds
    cot = grad_kss[r0:r1, c0:c1]
    if r0 != c0:
        cot = cot + grad_kss[c0:c1, r0:r1].T
    if (r0, r1) == (c0, c1):  # a diagonal tile: K(a, a) as one function of a (the kernel's symmetric call)
        _, vjp = jax.vjp(lambda a: kernel(a, a), x_s[r0:r1])
        (ga,) = vjp(cot)
        return jnp.zeros_like(x_s).at[r0:r1].add(ga)
    _, vjp = jax.vjp(kernel, x_s[r0:r1], x_s[c0:c1])
    ga, gb = vjp(cot)
    return jnp.zeros_like(x_s).at[r0:r1].add(ga).at[c0:c1].add(gb)


def target_terms(kernel: PairKernel, x_s: Any, alpha: Any, x_t: Any, y_t: Any) -> dict[str, jax.Array]:
    """One target shard's summed loss, correct count, dL/dx_s through K_ts, and u = K_ts^T r (n_s, C)."""
    k_ts, vjp = jax.vjp(lambda xs: kernel(x_t, xs), x_s)
    pred = k_ts @ alpha
    r = y_t - pred
    (gx,) = vjp(-r @ alpha.T)
    return {"loss": 0.5 * jnp.sum(r**2), "correct": jnp.sum(jnp.argmax(pred, 1) == jnp.argmax(y_t, 1)),
            "gx": gx, "u": k_ts.T @ r}


def factor_kss(k_ss: Any, reg: float) -> Any:
    """LU factors of ``K_ss + lam I``: one O(n_s^3) factorisation that :func:`solve_kss` reuses for alpha and for
    the cotangent's solve (a 10,000-image support: ~6.7e11 flop, the most expensive dense step of a tiled KIP step)."""
    return jax.scipy.linalg.lu_factor(regularised(k_ss, reg))


def solve_kss(factors: Any, rhs: Any) -> jax.Array:
    """``(K_ss + lam I)^-1 rhs`` from :func:`factor_kss`'s factors."""
    return jax.scipy.linalg.lu_solve(factors, rhs)


def kss_cotangent(k_ss: Any, alpha: Any, u: Any, reg: float, factors: Any = None) -> tuple[jax.Array, jax.Array]:
    """``(dL/dK_ss (n_s, n_s), dL/dy_s (n_s, C))`` from the assembled K_ss, alpha and the summed u (``factors``:
    :func:`factor_kss` of the same K_ss, to skip a second factorisation)."""
    n = k_ss.shape[0]
    beta = solve_kss(factors if factors is not None else factor_kss(k_ss, reg), u)  # A is symmetric: A^-T u = A^-1 u
    grad_a = beta @ alpha.T
    return grad_a + (reg / n) * jnp.trace(grad_a) * jnp.eye(n, dtype=k_ss.dtype), -beta
