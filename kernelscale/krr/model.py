"""Model stores: what a converged solve writes and ``evaluate`` reads back.

A model store (``MODEL.zarr``) is a Zarr v3 group::

    alpha    float64 (N, C), crc32c
    attrs    kernelscale="model", gram_fingerprint, data_fingerprint, spec, reg, reg_scale, reg_effective,
             num_classes, class_names, solver, precond, status, iterations, rel_residual, tol, complete

``complete`` is set last: a model cut short by a crash is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernelscale import storage
from kernelscale.data import DatasetStore, available_memory
from kernelscale.errors import StoreError
from kernelscale.gram.store import GramStore

MODEL_FORMAT_VERSION = 1


def write_model(out: str, alpha: np.ndarray, *, store: GramStore, data: DatasetStore, summary: dict[str, Any],
                tol: float) -> None:
    """Write MODEL.zarr (``complete`` is set last: a model cut short by a crash is refused by eval)."""
    if storage.exists(out):
        storage.remove_store(out, "model")
    try:
        group = storage.open_group(out, "w-")
        group.attrs.update({"kernelscale": "model", "complete": False})  # ours from the first write on
        arr = storage.checksummed_array(group, "alpha", alpha.shape, (min(alpha.shape[0], 65536), alpha.shape[1]),
                                        "float64", np.nan)
        arr[...] = alpha
        group.attrs.update({
            "kernelscale": "model", "format_version": MODEL_FORMAT_VERSION, "gram_fingerprint": store.fingerprint,
            "gram_path": store.path, "data_fingerprint": data.fingerprint, "spec": store.attrs.get("spec"),
            "num_classes": data.num_classes, "class_names": data.class_names, "tol": tol,
            **{k: summary[k] for k in ("reg", "reg_scale", "reg_effective", "solver", "precond", "status",
                                       "iterations", "rel_residual")},
        })
        group.attrs["complete"] = True
    except OSError as exc:
        if storage.is_disk_full(exc):
            storage.remove(out)  # the partial model just created here: the rerun starts clean
            raise storage.disk_full_error(out, "writing the model (nothing of it was kept; a --checkpoint is)") from None
        raise


def check_model_layout(path: str, group: Any, attrs: dict[str, Any]) -> None:
    """Refuse a model store whose attributes or ``alpha`` differ from the layout in the module docstring."""
    fix = "rerun `kernelscale solve` to write it again"
    req = storage.require
    req(path, attrs.get("format_version") == MODEL_FORMAT_VERSION, "format_version", str(MODEL_FORMAT_VERSION),
        attrs.get("format_version"), fix)
    c = attrs.get("num_classes")
    req(path, storage.is_int(c, 1), "num_classes", "an integer >= 1", c, fix)
    for key in ("gram_fingerprint", "data_fingerprint"):
        req(path, isinstance(attrs.get(key), str) and attrs[key].startswith("sha256:"), key, "a 'sha256:...' string",
            attrs.get(key), fix)
    req(path, attrs.get("spec") is None or isinstance(attrs.get("spec"), dict), "spec", "a kernel spec object",
        attrs.get("spec"), fix)
    metas = storage.members(group, path)
    storage.check_members(path, metas, lambda name, meta: name == "alpha", fix)
    n = (metas.get("alpha") or {}).get("shape", [0])[0]
    storage.check_array(path, "alpha", metas.get("alpha"), dtype="float64", shape=(None, c),
                        chunks=(min(max(int(n), 1), 65536) if storage.is_int(n, 1) else None, c), fill="NaN", fix=fix)
    if int(n) * c * 8 > available_memory() // 2:
        raise StoreError(f"{path}: array 'alpha' of shape ({n}, {c}) would need {int(n) * c * 8 / 2**30:.1f} GiB, more "
                         f"than half the available memory; {fix}")


def open_model(path: str) -> tuple[dict[str, Any], np.ndarray]:
    """(attrs, alpha) of a model store; refuses incomplete or non-model stores."""
    if not storage.exists(path):
        raise StoreError(f"{path}: no model store there (create one with `kernelscale solve ... --out {path}`)")
    if storage.store_kind(path) == "distilled":
        raise StoreError(f"{path} is a distilled support set, not a model: score it without a cross Gram, "
                         f"`kernelscale evaluate {path} --test TEST.zarr` (in Python: kernelscale.kip.run.evaluate)")
    group = storage.open_group(path, "r")
    attrs = dict(group.attrs)
    if attrs.get("kernelscale") != "model":
        raise StoreError(f"{path} is not a kernelscale model store (create one with `kernelscale solve`)")
    if not attrs.get("complete") or attrs.get("status") != "converged":
        raise StoreError(f"{path} is incomplete or not converged; rerun `kernelscale solve`")
    check_model_layout(path, group, attrs)  # from the raw metadata, before zarr parses alpha
    try:
        alpha = np.asarray(group["alpha"][...], np.float64)
    except ValueError as exc:
        raise StoreError(f"{path}: alpha is corrupt ({exc}); rerun `kernelscale solve`") from exc
    if not np.isfinite(alpha).all():
        raise StoreError(f"{path}: alpha has missing or non-finite values; rerun `kernelscale solve`")
    return attrs, alpha
