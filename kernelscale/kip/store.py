"""Distilled stores: the result of ``kernelscale distill`` (a KIP support set) with its history and checkpoints.

Layout (Zarr v3 group)::

    x                    float32 (K*C, *input_shape)  support inputs, in DATA's preprocessed input space
    labels               float32 (K*C, C)             support labels (learned, or one-hot minus 1/C)
    support_rows         int64   (K*C,)               the DATA rows the support was initialised from
    history/loss         float32 (steps,)             loss per step (before the step's update)
    history/val_step     int64   (k,)                 steps at which validation accuracy was measured
    history/val_accuracy float32 (k,)
    checkpoints/<step>/  leaf_000.. (the flattened KipState), loss, val_step, val_accuracy
    attrs  kernelscale="distilled", arch (spec JSON), kernel, reg, dataset_fingerprint, steps_done,
           checkpoint (step of the committed checkpoint, or null), config (the run's settings), ...

A checkpoint is committed atomically: its arrays are written under ``checkpoints/<step>`` first, and only then
is ``attrs["checkpoint"]`` (one atomic metadata write) pointed at it; older checkpoints are deleted after.
A kill at any moment leaves the previously committed checkpoint readable and pointed to.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import zarr

from kernelscale import storage
from kernelscale.data import available_memory
from kernelscale.errors import StoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


FIX = "distil again into a new --out (`kernelscale distill DATA.zarr --out NEW.zarr`)"
HISTORY = {"loss": "float32", "val_step": "int64", "val_accuracy": "float32"}
LEAF_DTYPES = ("float32", "float64", "int32", "int64", "uint32")


def check_layout(path: str, group: zarr.Group, attrs: dict[str, Any]) -> None:
    """Refuse a distilled store whose attributes or arrays differ from the layout in the module docstring.

    Checkpoint groups other than the committed one may be partial (a run stopped while writing one) and are
    only checked for their array types; the committed one must hold its leaves and history.
    """
    req = storage.require
    req(path, attrs.get("format_version") == FORMAT_VERSION, "format_version", str(FORMAT_VERSION),
        attrs.get("format_version"), FIX)
    req(path, storage.is_int(attrs.get("steps_done"), -1), "steps_done", "an integer >= -1", attrs.get("steps_done"), FIX)
    ckpt = attrs.get("checkpoint")
    req(path, ckpt is None or storage.is_int(ckpt, 0), "checkpoint", "null or a step >= 0", ckpt, FIX)
    shape = attrs.get("input_shape")
    req(path, isinstance(shape, list) and len(shape) == 3 and all(storage.is_int(v, 1) for v in shape), "input_shape",
        "[H, W, C] with positive integers", shape, FIX)
    c = attrs.get("num_classes")
    req(path, storage.is_int(c, 1), "num_classes", "an integer >= 1", c, FIX)
    reg = attrs.get("reg")
    req(path, isinstance(reg, (int, float)) and not isinstance(reg, bool) and math.isfinite(reg) and reg >= 0, "reg",
        "a finite number >= 0", reg, FIX)
    req(path, isinstance(attrs.get("spec"), dict), "spec", "a kernel spec object", attrs.get("spec"), FIX)
    metas = storage.members(group, path)

    def allowed(name: str, meta: dict[str, Any]) -> bool:
        parts = name.split("/")
        if name in ("x", "labels", "support_rows", "history", "checkpoints"):
            return True
        if parts[0] == "history" and len(parts) == 2:
            return parts[1] in HISTORY
        if parts[0] == "checkpoints" and len(parts) in (2, 3) and parts[1].isdigit():
            return len(parts) == 2 or parts[2] in HISTORY or (parts[2].startswith("leaf_") and parts[2][5:].isdigit())
        return False

    storage.check_members(path, metas, allowed, FIX)
    rows = metas.get("support_rows")
    storage.check_array(path, "support_rows", rows, dtype="int64", shape=1, fill=-1, fix=FIX)
    n_s = int(rows["shape"][0])
    storage.check_array(path, "x", metas.get("x"), dtype="float32", shape=(n_s, *shape), chunks=(None, *shape),
                        fill="NaN", fix=FIX)
    storage.check_array(path, "labels", metas.get("labels"), dtype="float32", shape=(n_s, c), fill="NaN", fix=FIX)
    for name, meta in metas.items():
        parts = name.split("/")
        if meta.get("node_type") != "array" or parts[0] not in ("history", "checkpoints"):
            continue
        if parts[-1] in HISTORY:
            storage.check_array(path, name, meta, dtype=HISTORY[parts[-1]], shape=1, checksum=False, fix=FIX)
        else:
            storage.check_array(path, name, meta, dtype=LEAF_DTYPES, shape=len(meta.get("shape", [])), fix=FIX)
    if ckpt is not None:
        for key in HISTORY:
            if f"checkpoints/{ckpt}/{key}" not in metas:
                raise StoreError(f"{path}: the committed checkpoint {ckpt} lacks its {key!r} array; {FIX}")


class DistilledStore:
    """An opened distilled store (see the module docstring)."""

    def __init__(self, path: str, group: zarr.Group):
        storage.checked_attrs(path, group, "distilled", check_layout)
        self.path = str(path)
        self.group = group

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    # -- final support ---------------------------------------------------------------------------------
    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x (n_s, *shape), labels (n_s, C))`` as float32; refuses a store that holds no support yet."""
        if int(self.attrs.get("steps_done", -1)) < 0:
            raise StoreError(f"{self.path}: the distillation has not written a support set yet; rerun with --resume")
        need = self.group["x"].nbytes + self.group["labels"].nbytes
        if need > available_memory() // 2:
            raise StoreError(f"{self.path}: its support set would need {need / 2**30:.1f} GiB, more than half the "
                             f"available memory; {FIX}")
        x = np.asarray(self.group["x"][...], np.float32)
        labels = np.asarray(self.group["labels"][...], np.float32)
        if not (np.isfinite(x).all() and np.isfinite(labels).all()):
            raise StoreError(f"{self.path}: the support set holds non-finite values; it cannot be used")
        return x, labels

    def write_support(self, x: np.ndarray, labels: np.ndarray, history: dict[str, np.ndarray], steps_done: int) -> None:
        """Write the current support set and history at the top level, then ``attrs["steps_done"]``."""
        self.group["x"][...] = np.asarray(x, np.float32)
        self.group["labels"][...] = np.asarray(labels, np.float32)
        self._write_history(self.group.require_group("history"), history)
        self.group.attrs.update({"steps_done": int(steps_done), "updated": _now()})

    def history(self) -> dict[str, np.ndarray]:
        if "history" not in self.group:
            return empty_history()
        h = self.group["history"]
        return {k: np.asarray(h[k][...]) for k in ("loss", "val_step", "val_accuracy") if k in h}

    @staticmethod
    def _write_history(group: zarr.Group, history: dict[str, np.ndarray]) -> None:
        for name, dtype in (("loss", "float32"), ("val_step", "int64"), ("val_accuracy", "float32")):
            values = np.asarray(history.get(name, []), dtype)
            arr = group.create_array(name, shape=values.shape, chunks=(max(1, len(values)),), dtype=dtype,
                                     fill_value=0, overwrite=True)
            if len(values):
                arr[...] = values

    # -- checkpoints -----------------------------------------------------------------------------------
    def write_checkpoint(self, step: int, leaves: list[np.ndarray], history: dict[str, np.ndarray]) -> None:
        """Write a checkpoint of the flattened state at ``step`` and commit it atomically (see module doc)."""
        ckpts = self.group.require_group("checkpoints")
        name = str(int(step))
        if name in ckpts:
            del ckpts[name]
        g = ckpts.create_group(name)
        for i, leaf in enumerate(leaves):
            leaf = np.asarray(leaf)
            flat = leaf.reshape(-1) if leaf.ndim == 0 else leaf
            arr = storage.checksummed_array(g, f"leaf_{i:03d}", flat.shape, _chunks(flat.shape), flat.dtype, 0)
            arr[...] = flat
        self._write_history(g, history)
        g.attrs.update({"num_leaves": len(leaves), "step": int(step), "written": _now()})
        self.group.attrs.update({"checkpoint": int(step)})  # the commit point
        for old in list(ckpts.group_keys()):
            if old != name:
                del ckpts[old]
        log.info("checkpoint committed at step %d", step)

    def latest_checkpoint(self, template: list[np.ndarray]) -> tuple[int, list[np.ndarray], dict[str, np.ndarray]] | None:
        """``(step, leaves, history)`` of the committed checkpoint, reshaped like ``template``; None if none."""
        step = self.attrs.get("checkpoint")
        if step is None:
            return None
        try:
            g = self.group["checkpoints"][str(int(step))]
        except KeyError:
            raise StoreError(f"{self.path}: attrs point at checkpoint {step}, which is missing; the store is damaged") from None
        if int(g.attrs.get("num_leaves", -1)) != len(template):
            raise StoreError(f"{self.path}: checkpoint {step} does not match this run's state layout (other settings?)")
        leaves = []
        for i, like in enumerate(template):
            value = np.asarray(g[f"leaf_{i:03d}"][...])
            like = np.asarray(like)
            if value.size != like.size or value.dtype != like.dtype:
                raise StoreError(f"{self.path}: checkpoint {step} leaf {i} has another shape/dtype than this run's state")
            leaves.append(value.reshape(like.shape))
        history = {k: np.asarray(g[k][...]) for k in ("loss", "val_step", "val_accuracy")}
        return int(step), leaves, history


def empty_history() -> dict[str, np.ndarray]:
    return {"loss": np.zeros(0, np.float32), "val_step": np.zeros(0, np.int64), "val_accuracy": np.zeros(0, np.float32)}


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        return ()
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return (max(1, min(shape[0], (64 << 20) // max(1, 4 * row))), *shape[1:])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def create_distilled(path: str, *, n_support: int, input_shape: tuple[int, ...], num_classes: int,
                     support_rows: np.ndarray, attrs: dict[str, Any]) -> DistilledStore:
    """Create an empty distilled store (``steps_done`` = -1 until the first support is written)."""
    group = storage.open_group(path, "w-")
    try:
        shape = (n_support, *input_shape)
        storage.checksummed_array(group, "x", shape, _chunks(shape), "float32", np.nan)
        storage.checksummed_array(group, "labels", (n_support, num_classes), (n_support, num_classes), "float32",
                                  np.nan)
        rows = storage.checksummed_array(group, "support_rows", (n_support,), (n_support,), "int64", -1)
        rows[...] = np.asarray(support_rows, np.int64)
        group.attrs.update({"kernelscale": "distilled", "format_version": FORMAT_VERSION, "steps_done": -1,
                            "checkpoint": None, "created": _now()} | attrs)
    except OSError as exc:
        if storage.is_disk_full(exc):
            storage.remove(path)  # the partial store just created here: the rerun starts clean
            raise storage.disk_full_error(path, "creating the distilled store (nothing of it was kept)") from None
        raise
    return DistilledStore(path, group)


def open_distilled(path: str, mode: str = "r") -> DistilledStore:
    """Open a distilled store for reading (``'r'``) or for continuing a run (``'r+'``)."""
    if not storage.exists(path):
        raise StoreError(f"{path}: no distilled store there (create one with `kernelscale distill DATA.zarr --out {path}`)")
    return DistilledStore(path, storage.open_group(path, mode))
