"""Finite networks beside their infinite-width kernels.

- :func:`width_errors`: the empirical NTK of randomly initialised finite networks (averaged over seeds)
  against the analytic NTK, as width grows (expected to fall roughly like width^-1/2), and the drift of the
  empirical NTK during full-batch gradient descent (the lazy-regime assumption).
- :func:`train_finite`: train a finite network of a kernel's architecture (neural-tangents stax init/apply,
  optax) on a (distilled) support set and measure held-out accuracy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernelscale.errors import InputError
from kernelscale.kernels import KernelSpec, empirical_ntk_fn, kernel_fn, network

log = logging.getLogger(__name__)


@dataclass
class WidthReport:
    """Relative Frobenius errors ||mean_s Θ_w,s − Θ|| / ||Θ|| per width, and NTK drift under training."""

    widths: list[int]
    errors: list[float]
    drift: list[float]
    slope: float  # fitted d log(error) / d log(width)
    drift_slope: float
    seconds: float
    rows: int
    seeds: int
    per_seed_errors: list[list[float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("widths", "errors", "drift", "slope", "drift_slope", "seconds",
                                              "rows", "seeds", "per_seed_errors")}


def _slope(widths: list[int], values: list[float]) -> float:
    w, v = np.log(np.asarray(widths, float)), np.log(np.maximum(np.asarray(values, float), 1e-30))
    return float(np.polyfit(w, v, 1)[0]) if len(w) > 1 else float("nan")


def width_errors(
    spec: KernelSpec,
    x: np.ndarray,
    y: np.ndarray,
    widths: list[int],
    *,
    seeds: int = 2,
    drift_steps: int = 100,
    seed: int = 0,
) -> WidthReport:
    """Empirical vs analytic NTK on inputs ``x`` (n, H, W, C); drift under GD on targets ``y`` (n, C).

    The drift is ||Θ_T − Θ_0||_F / ||Θ_0||_F after ``drift_steps`` full-batch gradient-descent steps on the
    mean squared error with learning rate n / λ_max(Θ_0) (stable for the linearised dynamics).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    if spec.kernel != "ntk":
        raise InputError("validate-width compares empirical and analytic NTKs: use --kernel ntk")
    if not widths or min(widths) < 1:
        raise InputError(f"--widths must be positive integers, got {widths}")
    t0 = time.perf_counter()
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    analytic = np.asarray(kernel_fn(spec)(x, x, "ntk"), np.float64)
    norm = np.linalg.norm(analytic)
    errors, drift, per_seed = [], [], []
    for width in widths:
        init_fn, apply_fn, _ = network(spec, width, out_dim=y.shape[1])
        ntk = jax.jit(empirical_ntk_fn(apply_fn, vmap_axes=0, trace_axes=(-1,)))
        mean = np.zeros_like(analytic)
        seed_errs = []
        params0 = None
        for s in range(seeds):
            _, params = init_fn(jax.random.PRNGKey(seed + s), x.shape)
            params0 = params0 if params0 is not None else params
            k = np.asarray(ntk(x, None, params), np.float64)  # trace_axes averages over outputs
            seed_errs.append(float(np.linalg.norm(k - analytic) / norm))
            mean += k / seeds
        errors.append(float(np.linalg.norm(mean - analytic) / norm))
        per_seed.append(seed_errs)
        drift.append(_ntk_drift(apply_fn, ntk, params0, x, y, drift_steps) if drift_steps > 0 else 0.0)
        log.info("width %d: error %.4f drift %.4f", width, errors[-1], drift[-1])
    return WidthReport(widths=list(widths), errors=errors, drift=drift, slope=_slope(widths, errors),
                       drift_slope=_slope(widths, drift) if drift_steps > 0 else float("nan"),
                       seconds=round(time.perf_counter() - t0, 2), rows=int(x.shape[0]), seeds=seeds,
                       per_seed_errors=per_seed)


def _ntk_drift(apply_fn: Any, ntk: Any, params: Any, x: Any, y: Any, steps: int) -> float:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    theta0 = np.asarray(ntk(x, None, params), np.float64)
    lr = x.shape[0] / max(np.linalg.eigvalsh(theta0).max(), 1e-12)

    def loss(p: Any) -> Any:
        return 0.5 * jnp.mean(jnp.sum((apply_fn(p, x) - y) ** 2, axis=1))

    @jax.jit
    def step(p: Any) -> Any:
        g = jax.grad(loss)(p)
        return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)

    for _ in range(steps):
        params = step(params)
    theta = np.asarray(ntk(x, None, params), np.float64)
    return float(np.linalg.norm(theta - theta0) / np.linalg.norm(theta0))


@dataclass
class FiniteResult:
    accuracy: float
    train_accuracy: float
    final_loss: float
    epochs: int
    width: int
    seconds: float
    history: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "train_accuracy": self.train_accuracy, "final_loss": self.final_loss,
                "epochs": self.epochs, "width": self.width, "seconds": self.seconds}


def train_finite(
    spec: KernelSpec,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    labels_test: np.ndarray,
    *,
    width: int = 512,
    epochs: int = 500,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    center: bool = True,
) -> FiniteResult:
    """Train the finite network of ``spec`` (MSE on targets ``y_train`` (n, C), Adam) and test it.

    Accuracy is argmax agreement with ``labels_test`` (n_test,). One epoch = one pass over the support set
    in mini-batches of ``batch_size`` (full batch when the support is smaller).

    ``center`` trains and predicts with f(x) = f(theta, x) - f(theta_0, x): the random function at
    initialisation (O(1) per output in NTK parameterisation) is subtracted, so the network is compared with
    the kernel's mean predictor rather than with one random draw around it. Measured on 100 MNIST digits
    (fc depth 3, width 1024): without centering, test accuracy 26-31%, the initial function's noise
    dominating the argmax; with centering 73-75%; kernel regression on the same rows 80%.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    if width < 1 or epochs < 1 or lr <= 0:
        raise InputError(f"need --width >= 1, --epochs >= 1 and --lr > 0 (got {width}, {epochs}, {lr})")
    t0 = time.perf_counter()
    n, c = y_train.shape
    init_fn, apply_fn, _ = network(spec, width, out_dim=c)
    key = jax.random.PRNGKey(seed)
    _, params = init_fn(key, (1, *x_train.shape[1:]))
    params0 = params

    def model(p: Any, xb: Any) -> Any:
        out = apply_fn(p, xb)
        return out - apply_fn(params0, xb) if center else out

    opt = optax.adam(lr)
    opt_state = opt.init(params)
    xt, yt = jnp.asarray(x_train, jnp.float32), jnp.asarray(y_train, jnp.float32)

    def loss(p: Any, xb: Any, yb: Any) -> Any:
        return 0.5 * jnp.mean(jnp.sum((model(p, xb) - yb) ** 2, axis=1))

    @jax.jit
    def step(p: Any, s: Any, xb: Any, yb: Any) -> Any:
        value, g = jax.value_and_grad(loss)(p, xb, yb)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    rng = np.random.default_rng(seed)
    bs = min(batch_size, n)
    history = []
    for _ in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n - bs + 1, bs):
            idx = order[start : start + bs]
            params, opt_state, value = step(params, opt_state, xt[idx], yt[idx])
            total += float(value)
        history.append(total / max(1, n // bs))

    predict = jax.jit(model)

    def accuracy(x: np.ndarray, labels: np.ndarray) -> float:
        hits = 0
        for start in range(0, len(x), 1024):
            out = np.asarray(predict(params, jnp.asarray(x[start : start + 1024], jnp.float32)))
            hits += int(np.sum(out.argmax(1) == labels[start : start + 1024]))
        return hits / max(1, len(x))

    return FiniteResult(
        accuracy=accuracy(x_test, labels_test),
        train_accuracy=accuracy(x_train, np.asarray(y_train).argmax(1)),
        final_loss=history[-1],
        epochs=epochs,
        width=width,
        seconds=round(time.perf_counter() - t0, 2),
        history=history,
    )
