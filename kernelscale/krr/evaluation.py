"""Scoring a model: the cross Gram's checks, accuracy and MSE of K(test, train) @ alpha.

Predictions on test rows are streamed tile by tile from a cross Gram store
(``kernelscale gram TEST.zarr --against DATA.zarr``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kernelscale.data import DatasetStore, open_dataset
from kernelscale.data.labels import one_hot
from kernelscale.errors import InputError, StoreError
from kernelscale.gram.operators import ZarrGramOperator
from kernelscale.gram.store import GramStore, open_gram
from kernelscale.krr.model import open_model


def check_cross(cross: GramStore, test: DatasetStore, train_fingerprint: str, n_train: int,
                spec: dict[str, Any] | None) -> None:
    """Refuse a cross Gram that is not K(test, train) for these stores (and this kernel); the common mix-ups
    (the train Gram itself, the reversed K(train, test)) are named with the command that makes the right one."""
    attrs = cross.attrs
    make = f"`kernelscale gram {test.path} --against TRAIN.zarr --out CROSS.zarr` (TRAIN.zarr: the model's data)"
    if attrs.get("against_fingerprint") is None and attrs.get("data_fingerprint") == train_fingerprint:
        raise StoreError(f"{cross.path} is the train Gram K(train, train), not a cross Gram K(test, train); "
                         f"compute the cross Gram with {make}")
    if attrs.get("data_fingerprint") == train_fingerprint and attrs.get("against_fingerprint") == test.fingerprint:
        raise StoreError(f"{cross.path} is K(train, test), the reverse of the cross Gram needed, K(test, train): "
                         f"compute it with DATA and --against swapped, {make}")
    if attrs.get("data_fingerprint") != test.fingerprint:
        raise StoreError(f"{cross.path} was computed on other test rows (data_fingerprint "
                         f"{attrs.get('data_fingerprint')} != {test.path}'s {test.fingerprint})")
    if attrs.get("against_fingerprint") != train_fingerprint:
        raise StoreError(f"{cross.path} is against other training data (against_fingerprint "
                         f"{attrs.get('against_fingerprint')} != the model's data {train_fingerprint}); compute "
                         f"`kernelscale gram {test.path} --against TRAIN.zarr`")
    if cross.shape != (test.n, n_train):
        raise StoreError(f"{cross.path} has shape {cross.shape}, expected ({test.n}, {n_train})")
    if spec is not None and attrs.get("spec") is not None and attrs.get("spec") != spec:
        raise StoreError(f"{cross.path} was computed with another kernel ({attrs.get('spec')}) than the model ({spec})")
    missing = cross.missing_tiles()
    if missing:
        raise StoreError(f"{cross.path} is incomplete: {len(missing)} tiles missing; rerun `kernelscale gram` to finish it")


def scores(pred: np.ndarray, test: DatasetStore) -> dict[str, float]:
    """accuracy (argmax vs labels) and mse (mean over rows and classes of (pred - (one-hot - 1/C))^2)."""
    return label_scores(pred, test.labels, test.num_classes)


def label_scores(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """:func:`scores` against integer ``labels`` (n,) of ``num_classes`` classes: accuracy and centred-one-hot mse."""
    if not np.isfinite(pred).all():
        raise StoreError("predictions are not finite: a store holds NaN/Inf values; run `kernelscale verify`")
    y = one_hot(labels, num_classes).astype(np.float64)
    return {"accuracy": float(np.mean(np.argmax(pred, axis=1) == labels)),
            "mse": float(np.mean((pred - y) ** 2))}


def evaluate(model: str, cross: str, test: str) -> dict[str, Any]:
    """Test accuracy and MSE of a model: K(test, train) @ alpha streamed from the cross store."""
    t0 = time.perf_counter()
    attrs, alpha = open_model(model)
    ts = open_dataset(test)
    cs = open_gram(cross)
    check_cross(cs, ts, attrs["data_fingerprint"], alpha.shape[0], attrs.get("spec"))
    ts.check_content()  # test rows/labels edited behind the fingerprint's back are refused (sampled chunks)
    if ts.num_classes != alpha.shape[1]:
        raise InputError(f"{test} has {ts.num_classes} classes, the model {alpha.shape[1]}")
    with ZarrGramOperator(cs, prefetch=2, psd=False) as op:
        pred = op.mm(alpha)
    return scores(pred, ts) | {"n_test": ts.n, "n_train": alpha.shape[0], "seconds": round(time.perf_counter() - t0, 3)}
