"""Robust accuracy of a distilled support set or a solved full-data model (``evaluate``/``eval --attack``).

The predictor is rebuilt from its stores as a :class:`~kernelscale.attack.kernel_pgd.KernelPredictor` (support: weights
``(K_ss + lam I)^-1 y_s``; model: the stored alpha against all N training rows, in chunks), the test rows are
mapped back to pixels (the test store's affine map, exact for affine preprocessing) and attacked with PGD.
With ``workers > 1`` the rows are cut into batch-aligned slices, one Ray task per slice; each task reads its
rows from the test store itself and seeds its batches by their global offset, so the per-row results equal
the single-process run for the same seed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernelscale import storage
from kernelscale.data import DatasetStore, open_dataset
from kernelscale.errors import InputError, StoreError
from kernelscale.gram.operators import ZarrGramOperator
from kernelscale.gram.store import open_gram
from kernelscale.kernels import load_spec
from kernelscale.krr import check_gram_for_data, check_reg, curve_solves, nested_order, open_model, parse_sizes
from kernelscale.runtime import ensure_ray, shutdown_if_started
from kernelscale.attack.kernel_pgd import Attack, KernelPredictor, attack_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class PredictorRecipe:
    """How to rebuild a kernel-regression predictor in any process.

    spec: kernel spec JSON; weights (N, C) float32; x_train (N, *shape) float32, or ``data_path`` (a dataset
    store whose rows are the training inputs, read by the process that builds); chunk: training rows per
    kernel block (bounds memory).
    """

    spec: str
    weights: np.ndarray
    x_train: np.ndarray | None = None
    data_path: str | None = None
    chunk: int = 4096
    allow_code: bool = False  # the command's --allow-code: user code re-checked by hash in every process

    def build(self) -> KernelPredictor:
        from kernelscale.kip.sharding import pair_kernel  # noqa: PLC0415  (kip imports jax)

        spec = load_spec(self.spec, allow_code=self.allow_code, where="the predictor's kernel spec")
        x = self.x_train
        if x is None:
            assert self.data_path is not None
            x = open_dataset(self.data_path).rows(0, len(self.weights))
        return KernelPredictor(pair_kernel(spec), x, self.weights, self.chunk)


def _attack_slice(recipe: PredictorRecipe, test_path: str, start: int, stop: int, attack: Attack, seed: int,
                  batch: int) -> dict[str, np.ndarray]:
    """Per-row correctness of test rows ``start..stop`` (runs locally or as a Ray task)."""
    test = open_dataset(test_path)
    pixels = np.clip(test.affine.invert(test.rows(start, stop)), 0.0, 1.0)
    return attack_rows(recipe.build(), test.affine.apply, pixels, test.labels[start:stop], attack, batch=batch,
                       seed=seed, offset=start)


def slices(n: int, batch: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous, batch-aligned row ranges covering 0..n (empty ranges dropped)."""
    batches = -(-n // batch)
    bounds = [(i * batches // workers) * batch for i in range(workers + 1)]
    return [(min(a, n), min(b, n)) for a, b in zip(bounds, bounds[1:]) if min(a, n) < min(b, n)]


def run_attack(recipe: PredictorRecipe, test_path: str, n: int, attack: Attack, *, seed: int = 0, batch: int = 100,
               workers: int = 1) -> dict[str, np.ndarray]:
    """Per-row ``clean``/``robust``/``noise`` correctness of the first ``n`` test rows, over ``workers`` processes."""
    if workers <= 1:
        return _attack_slice(recipe, test_path, 0, n, attack, seed, batch)
    import ray  # noqa: PLC0415  (defers ray)

    info = ensure_ray()
    try:
        task = ray.remote(num_cpus=1)(_attack_slice)
        ref = ray.put(recipe)
        path = os.path.abspath(test_path) if not storage.is_url(test_path) else test_path
        parts = ray.get([task.remote(ref, path, a, b, attack, seed, batch) for a, b in slices(n, batch, workers)])
    finally:
        shutdown_if_started(info)
    return {k: np.concatenate([p[k] for p in parts]) for k in ("clean", "robust", "noise")}


def _summary(rows: dict[str, np.ndarray], attack: Attack, seconds: float, workers: int) -> dict[str, Any]:
    n = max(1, len(rows["clean"]))
    return {"attack": attack.describe(), "attack_config": attack.to_json(), "n_attacked": int(len(rows["clean"])),
            "attacked_clean_accuracy": float(rows["clean"].sum() / n),
            "robust_accuracy": float(rows["robust"].sum() / n), "noise_accuracy": float(rows["noise"].sum() / n),
            "attack_workers": workers, "attack_seconds": round(seconds, 3)}


def _check_options(limit: int | None, batch: int, workers: int, chunk: int) -> None:
    for name, value in (("--attack-batch", batch), ("--workers", workers), ("--chunk", chunk)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if limit is not None and limit < 1:
        raise InputError(f"--attack-limit must be >= 1, got {limit}")


def attack_distilled(distilled: str, test: str, attack: Attack, *, limit: int | None = None, seed: int = 0,
                     batch: int = 100, workers: int = 1, allow_code: bool = False) -> dict[str, Any]:
    """PGD robust accuracy of kernel regression from a distilled support set on TEST's first ``limit`` rows."""
    import jax.numpy as jnp  # noqa: PLC0415  (defers jax)

    from kernelscale.kip.run import open_support  # noqa: PLC0415  (kip imports jax)
    from kernelscale.kip.sharding import pair_kernel  # noqa: PLC0415  (kip imports jax)
    from kernelscale.kip.step import krr_weights  # noqa: PLC0415  (kip imports jax)

    _check_options(limit, batch, workers, 1)
    attrs, test_store, spec, x_s, y_s = open_support(distilled, test, allow_code)
    kern = pair_kernel(spec)
    xs = jnp.asarray(x_s, jnp.float32)
    weights = np.asarray(krr_weights(kern(xs, xs), jnp.asarray(y_s, jnp.float32), float(attrs["reg"])))
    recipe = PredictorRecipe(spec.canonical(), weights, x_train=np.asarray(x_s, np.float32), chunk=len(x_s),
                             allow_code=allow_code)
    n = test_store.n if limit is None else min(limit, test_store.n)
    t0 = time.perf_counter()
    rows = run_attack(recipe, test, n, attack, seed=seed, batch=batch, workers=workers)
    return _summary(rows, attack, time.perf_counter() - t0, workers)


def model_training_data(attrs: dict[str, Any], data: str | None) -> DatasetStore:
    """The training dataset of a model: ``data`` if given, else the data path its Gram store recorded."""
    if data is None:
        gram_path = attrs.get("gram_path")
        try:
            data = open_gram(gram_path).attrs.get("data_path") if gram_path else None
        except Exception as exc:  # noqa: BLE001 - a moved Gram: ask for --data
            raise InputError(f"the model's Gram store {gram_path} cannot be opened ({exc}); pass --data DATA.zarr") from None
        if not data:
            raise InputError("the model does not record its training data; pass --data DATA.zarr")
    store = open_dataset(data)
    if store.fingerprint != attrs.get("data_fingerprint"):
        raise StoreError(f"{data} is not the model's training data (fingerprint {store.fingerprint} != "
                         f"{attrs.get('data_fingerprint')}); pass the DATA.zarr the Gram was computed on")
    return store


def attack_model(model: str, test: str, attack: Attack, *, data: str | None = None, limit: int | None = None,
                 seed: int = 0, batch: int = 100, workers: int = 1, chunk: int = 4096,
                 allow_code: bool = False) -> dict[str, Any]:
    """PGD robust accuracy of a solved full-data model (``K(x, X_train) @ alpha``) on TEST's first rows.

    The gradient goes through the analytic kernel against all N training rows, ``chunk`` rows at a time.
    """
    _check_options(limit, batch, workers, chunk)
    attrs, alpha = open_model(model)
    if attrs.get("spec") is None:
        raise StoreError(f"{model} does not record its kernel spec; re-solve it with this kernelscale version")
    spec = load_spec(attrs["spec"], allow_code=allow_code, where=model)  # before any data is read
    train = model_training_data(attrs, data)
    test_store = open_dataset(test)
    if test_store.input_shape != train.input_shape or test_store.affine.digest() != train.affine.digest():
        raise InputError(f"--test {test} does not share the training data's input shape and preprocessing; "
                         f"ingest it with --stats-from {train.path}")
    if test_store.num_classes != alpha.shape[1]:
        raise InputError(f"{test} has {test_store.num_classes} classes, the model {alpha.shape[1]}")
    path = os.path.abspath(train.path) if not storage.is_url(train.path) else train.path
    recipe = PredictorRecipe(spec.canonical(), alpha.astype(np.float32), data_path=path, chunk=chunk,
                             allow_code=allow_code)
    n = test_store.n if limit is None else min(limit, test_store.n)
    t0 = time.perf_counter()
    rows = run_attack(recipe, test, n, attack, seed=seed, batch=batch, workers=workers)
    return _summary(rows, attack, time.perf_counter() - t0, workers) | {"n_train": int(alpha.shape[0])}


def robust_curve(gram: str, data: str, test: str, sizes: Any, attacks: list[Attack], *, reg: float = 1e-4,
                 reg_scale: str = "trace", seed: int = 0, limit: int | None = None, batch: int = 100,
                 chunk: int = 4096, attack_seed: int = 0, progress: bool = False,
                 allow_code: bool = False) -> dict[str, Any]:
    """Clean and robust accuracy of KRR on nested class-balanced subsets of a stored train Gram.

    The subsets and solves are those of :func:`kernelscale.krr.curve` (first n rows of
    :func:`~kernelscale.krr.nested_order`, the loop :func:`~kernelscale.krr.curve_solves` with float64 Cholesky
    on K[S, S] read from the store; a failed solve raises NotConvergedError); each subset's
    predictor ``K(x, X_S) alpha_S`` is attacked through the analytic kernel on TEST's first ``limit`` rows.
    Returns per size: ``accuracy`` and, per attack, ``robust_accuracy`` and ``noise_accuracy``.
    """
    from kernelscale.kip.sharding import pair_kernel  # noqa: PLC0415  (kip imports jax)

    check_reg(reg, reg_scale)
    ds, ts = open_dataset(data), open_dataset(test)
    gs = open_gram(gram)
    check_gram_for_data(gs, ds)
    if ts.input_shape != ds.input_shape or ts.affine.digest() != ds.affine.digest():
        raise InputError(f"{test} does not share {data}'s input shape and preprocessing (ingest it with --stats-from)")
    sizes_l = parse_sizes(sizes, ds.n)
    order = nested_order(ds.labels, seed)[: sizes_l[-1]]
    with ZarrGramOperator(gs) as op:
        k_full = op.submatrix(order, order)
    y_all = ds.one_hot(order, centred=True).astype(np.float64)
    x_all = ds.take(order)
    kern = pair_kernel(load_spec(gs.attrs["spec"], allow_code=allow_code, where=gram))
    n_test = ts.n if limit is None else min(limit, ts.n)
    pixels = np.clip(ts.affine.invert(ts.rows(0, n_test)), 0.0, 1.0)
    labels = ts.labels[:n_test]
    result: dict[str, Any] = {"sizes": sizes_l, "accuracy": [], "n_test": n_test, "reg": reg, "seed": seed,
                              "attacks": {a.describe(): {"robust_accuracy": [], "noise_accuracy": []} for a in attacks}}
    solves = curve_solves(k_full, y_all, sizes_l, reg=reg, reg_scale=reg_scale, seed=seed, direct_max=sizes_l[-1],
                          progress=progress, desc="robust curve")  # every size by float64 Cholesky
    for n, alpha, _ in solves:
        predictor = KernelPredictor(kern, x_all[:n], alpha.astype(np.float32), chunk)
        clean = None
        for a in attacks:
            rows = attack_rows(predictor, ts.affine.apply, pixels, labels, a, batch=batch, seed=attack_seed)
            clean = float(rows["clean"].mean())
            result["attacks"][a.describe()]["robust_accuracy"].append(float(rows["robust"].mean()))
            result["attacks"][a.describe()]["noise_accuracy"].append(float(rows["noise"].mean()))
        result["accuracy"].append(clean)
    return result
