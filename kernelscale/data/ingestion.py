"""Ingestion: a source's rows (a balanced subset, a stratified validation split, a class-mixed order) into a
new dataset store, written next to OUT and renamed into place; an interrupted ingest continues from its
partial store."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Sequence

import numpy as np
import zarr
from tqdm.auto import tqdm

from kernelscale import storage
from kernelscale.data.preprocess import AffineMap, Preprocess, compute_statistics, pixels_as_float
from kernelscale.data.sources import BUILTINS, ImageFolderSource, Source, open_source, parse_resize
from kernelscale.data.store import (FORMAT_VERSION, STORE_DTYPES, content_digest, fingerprint_rows,
                                    open_dataset)
from kernelscale.errors import InputError, StoreError

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # target bytes per row chunk of x
PARTIAL_SUFFIX = ".partial-ingest"  # a local ingest is written here, then renamed; a rerun continues it


def _rows_per_chunk(row_shape: Sequence[int], itemsize: int = 4) -> int:
    """Rows per chunk of x: about CHUNK_BYTES per chunk, at most 4096 rows."""
    return max(1, min(4096, CHUNK_BYTES // (itemsize * int(np.prod(row_shape)))))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted, with ``fraction`` of every class in val (at least 1 if possible)."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.append(rng.choice(idx, size=k, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def mixed_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of rows (N,) that spreads every class evenly along the store (``ingest --shuffle``).

    Each class's rows, in a random order, are placed at evenly spaced fractional positions (rank + u) / count
    with u uniform in [0, 1): any run of consecutive rows, a chunk of the store included, then holds about
    every class in its overall proportion.
    """
    rng = np.random.default_rng([seed, 0x6D6978])
    key = np.empty(len(labels))
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        key[rows] = (np.arange(len(rows)) + rng.random(len(rows))) / len(rows)
    return np.argsort(key, kind="stable")


def balanced_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """A class-balanced, seeded subset of ``limit`` rows, in the original (sorted) order."""
    if limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for idx in per_class:
            if depth < len(idx) and len(picked) < limit:
                picked.append(int(idx[depth]))
        depth += 1
    return np.sort(np.asarray(picked, np.int64))


def partial_path(out: str) -> str:
    """Where a local ingest into ``out`` is written before it is renamed into place (a rerun resumes it)."""
    return os.path.abspath(out).rstrip(os.sep) + PARTIAL_SUFFIX


def ingest_plan(source: Source, idx: np.ndarray, pre: Preprocess, stats: AffineMap | None, stats_from: str | None,
                augment: str | None, store_dtype: str) -> str:
    """sha256 of everything a dataset store's content is a function of: a partial store is continued only
    when the rerun's plan is the same."""
    h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "source": source.digest(), "preprocess": pre.to_json(),
                                   "stats": stats.digest() if stats is not None else None, "stats_from": stats_from,
                                   "augment": augment, "store_dtype": store_dtype,
                                   "row_shape": list(source.row_shape)}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(idx, np.int64).data)
    return h.hexdigest()


def _open_partial(target: str, plan: str) -> tuple[zarr.Group, dict[str, Any]]:
    """The partial store at ``target`` with its progress when its plan is ``plan``, else a new one (a stale
    partial store of ours is removed; anything else there is refused by :func:`storage.remove_store`)."""
    if storage.exists(target):
        progress = None
        try:
            group = storage.open_group(target, "r+")
            progress = dict(group.attrs).get("ingest_progress")
        except (StoreError, ValueError, OSError):
            pass
        if isinstance(progress, dict) and progress.get("plan") == plan:
            log.info("continuing the partial ingest at %s (%d rows written)", target, progress.get("pixels_done", 0))
            return group, progress
        log.info("%s holds a partial ingest of other data or options; starting again", target)
        storage.remove_store(target, "dataset")
    group = storage.open_group(target, "w-")
    progress = {"plan": plan, "pixels_done": 0, "stats_saved": False, "x_done": 0}
    group.attrs.put({"kernelscale": "dataset", "ingest_progress": progress})  # ours from the first write
    return group, progress


def _write_store(
    out: str,
    source: Source,
    idx: np.ndarray,
    pre: Preprocess,
    stats: AffineMap | None,
    stats_from: str | None,
    augment: str | None,
    progress: bool,
    desc: str,
    replace: bool = False,
    store_dtype: str = "float32",
    plan: str = "",
) -> dict[str, Any]:
    """Decode rows ``idx`` of ``source`` into a new store at ``out`` (written next to it, then renamed).

    Local paths are written to :func:`partial_path` with their progress in its attributes: an interrupted or
    killed ingest continues there on a rerun with the same ``plan`` (:func:`ingest_plan`), keeping the rows
    written, and gives the same store as an uninterrupted one. Passes: pixels (the decode; uint8 stores keep
    them as x), preprocessing statistics, x (float stores), one read for the fingerprint and content hashes.

    ``replace``: an existing dataset store at ``out`` is deleted only once the new one is complete (local
    paths; on object storage before writing). A full disk or bad input is one line naming the path, and the
    partial store is removed, so the rerun starts clean.
    """
    local = not storage.is_url(out)
    if replace and not local:
        storage.remove_store(out, "dataset")
    target = out
    if local:
        os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
        target = partial_path(out)
        group, state = _open_partial(target, plan)
    else:
        group = storage.open_group(target, "w-")
        state = {"plan": plan, "pixels_done": 0, "stats_saved": False, "x_done": 0}
        group.attrs["kernelscale"] = "dataset"

    def save_progress(**changes: Any) -> None:
        state.update(changes)
        if local:
            group.attrs["ingest_progress"] = state

    try:
        flips = augment == "hflip"
        n = len(idx) * (2 if flips else 1)
        row_shape = tuple(source.row_shape)
        itemsize = np.dtype(store_dtype).itemsize
        chunk = _rows_per_chunk(row_shape, itemsize)
        pixel_dtype = "uint8" if source.uint8 else "float32"
        if store_dtype == "uint8":  # the pixels are the stored rows
            raw = group["x"] if "x" in group else storage.checksummed_array(
                group, "x", (n, *row_shape), (chunk, *row_shape), "uint8", 0)
        elif "_pixels" in group:
            raw = group["_pixels"]
        else:
            raw = group.create_array("_pixels", shape=(n, *row_shape), chunks=(chunk, *row_shape), dtype=pixel_dtype,
                                     fill_value=0)
        block = chunk * max(1, 4096 // chunk)
        done = int(state["pixels_done"])
        bar = tqdm(total=len(idx), initial=done, desc=desc, unit="img", disable=not progress, leave=False)
        for start in range(done, len(idx), block):  # done: a multiple of block, or all rows
            pix = source.read_pixels(idx[start : start + block])
            raw[start : start + len(pix)] = pix
            if flips:
                raw[len(idx) + start : len(idx) + start + len(pix)] = pix[:, :, ::-1, :]
            save_progress(pixels_done=start + len(pix))
            bar.update(len(pix))
        bar.close()
        labels = source.labels[idx]
        if flips:
            labels = np.concatenate([labels, labels])
        if stats is not None:
            affine = stats
        elif state["stats_saved"]:
            affine = AffineMap.load(group)
        else:
            affine = compute_statistics(raw, pre, progress)
            affine.save(group)
            save_progress(stats_saved=True)
        if store_dtype == "uint8":
            x = raw
        else:
            x = group["x"] if "x" in group else storage.checksummed_array(
                group, "x", (n, *row_shape), (chunk, *row_shape), store_dtype, np.nan)
            done = int(state["x_done"])
            for start in range(done, n, block):
                values = affine.apply(pixels_as_float(np.asarray(raw[start : start + block]))).astype(np.float32)
                with np.errstate(over="ignore"):
                    stored = values.astype(store_dtype)
                if store_dtype == "float16" and not np.isfinite(stored).all():
                    raise InputError(f"{source.name}: preprocessed values up to {np.abs(values).max():.3g} exceed "
                                     "float16's range (65504); use --store-dtype float32 or a --preprocess")
                x[start : start + block] = stored
                save_progress(x_done=start + len(values))
            if "_pixels" in group:
                del group["_pixels"]
        lab = group["labels"] if "labels" in group else storage.checksummed_array(
            group, "labels", (n,), (max(n, 1),), "int64", -1)
        lab[...] = labels
        affine.save(group)
        pre_json = pre.to_json() | {"stats_from": stats_from}
        counts = {name: int(np.sum(labels == c)) for c, name in enumerate(source.class_names)}
        fingerprint, chunk_digests = fingerprint_rows(x, labels, pre_json, affine, store_dtype)
        attrs = {
            "content_sha256": {"x_chunks": chunk_digests, "labels": content_digest(np.asarray(labels, np.int64)),
                               "affine": affine.digest()},
            "kernelscale": "dataset",
            "format_version": FORMAT_VERSION,
            "class_names": list(source.class_names),
            "source": source.name,
            "n": n,
            "counts": counts,
            "input_shape": list(row_shape),
            "preprocess": pre_json,
            "augment": augment,
            "fingerprint": fingerprint,
            "ingest_plan": plan,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if store_dtype != "float32":
            attrs["store_dtype"] = store_dtype
        group.attrs.put(attrs)  # replaces the progress record: the store is complete
        if local:
            if replace and storage.exists(out):
                storage.remove_store(out, "dataset")
            os.replace(target, out)
    except BaseException as exc:
        disk_full = isinstance(exc, OSError) and storage.is_disk_full(exc)
        if local and (disk_full or isinstance(exc, InputError)):
            shutil.rmtree(target, ignore_errors=True)
        elif local:
            log.warning("ingest stopped; rerun the same command to continue from row %d (kept in %s)",
                        state["pixels_done"], target)
        if disk_full:
            raise storage.disk_full_error(out, "writing the dataset store (nothing of it was kept)") from None
        raise
    return {"path": out, "n": n, "input_shape": list(row_shape), "num_classes": len(source.class_names),
            "counts": counts, "fingerprint": fingerprint, "preprocess": pre_json, "store_dtype": store_dtype,
            "_affine": affine}


def _completed(out: str, plan: str, overwrite: bool, val_out: str | None
               ) -> tuple[dict[str, Any], AffineMap] | None:
    """OUT's summary and preprocessing when OUT is a complete store of this very ingest and only ``val_out``
    is still to be written (a rerun after a kill during the validation split); None when OUT is to be written.
    Refuses an existing OUT (or VAL) without ``overwrite`` otherwise."""
    if val_out and not overwrite and storage.exists(out) and not storage.exists(val_out):
        if storage.store_kind(out) == "dataset":
            ds = open_dataset(out)
            if ds.attrs.get("ingest_plan") == plan:
                log.info("%s is complete; continuing with %s", out, val_out)
                summary = {"path": out, "n": ds.n, "input_shape": list(ds.input_shape),
                           "num_classes": ds.num_classes, "counts": ds.attrs.get("counts"),
                           "fingerprint": ds.fingerprint, "preprocess": ds.attrs.get("preprocess"),
                           "store_dtype": ds.store_dtype}
                return summary, ds.affine
    for path in filter(None, (out, val_out)):
        if storage.exists(path) and not overwrite:
            raise InputError(f"{path} already exists; pass --overwrite to replace it, or choose another OUT")
    return None


def ingest(
    src: str,
    out: str,
    *,
    format: str = "auto",  # noqa: A002 - mirrors the CLI flag
    resize: str | tuple[int, int] | None = None,
    preprocess: str | Preprocess = "none",
    stats_from: str | None = None,
    val_fraction: float = 0.0,
    val_out: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    augment: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    store_dtype: str = "float32",
    shuffle: bool = False,
) -> dict[str, Any]:
    """Ingest SRC (ImageFolder dir, .npz, or builtin name) into a dataset store at OUT.

    ``store_dtype``: float32 or float16 model inputs, or uint8 pixels preprocessed on read (see STORE_DTYPES).
    An interrupted or killed ingest to a local OUT continues where it stopped when rerun with the same
    arguments (also when only the --val-out split was missing). ``shuffle``: rows are stored in
    :func:`mixed_order` (every class spread evenly along the store) instead of the source's order.
    Returns a JSON-able summary. All checks on the arguments and sources run before anything is written.
    """
    t0 = time.perf_counter()
    if store_dtype not in STORE_DTYPES:
        raise InputError(f"--store-dtype must be {', '.join(STORE_DTYPES)}, got {store_dtype!r}")
    pre = preprocess if isinstance(preprocess, Preprocess) else Preprocess.parse(preprocess)
    size = parse_resize(resize) if isinstance(resize, str) or resize is None else tuple(resize)
    if augment not in (None, "none", "hflip"):
        raise InputError(f"--augment must be none or hflip, got {augment!r}")
    augment = None if augment == "none" else augment
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0 and not val_out:
        raise InputError("--val-fraction needs --val-out VAL.zarr (where to write the validation split)")
    if val_out and val_fraction <= 0:
        raise InputError("--val-out needs --val-fraction F > 0")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    for path in filter(None, (out, val_out)):
        # OUT may exist without --overwrite only as a complete store of this ingest whose --val-out is missing
        # (checked against the ingest's plan once the source is open: _completed)
        val_pending = path == out and val_out and not storage.exists(val_out) and storage.store_kind(out) == "dataset"
        if storage.exists(path) and not overwrite and not val_pending:
            raise InputError(f"{path} already exists; pass --overwrite to replace it, or choose another OUT")
        storage.check_replaceable(path, "dataset")  # --overwrite replaces only a kernelscale dataset store
    if val_out and os.path.abspath(val_out) == os.path.abspath(out):
        raise InputError("--val-out must differ from OUT")
    src_path = None if src in BUILTINS and not os.path.exists(src) else src
    storage.check_disjoint(out, [("SRC", src_path), ("--stats-from", stats_from), ("--val-out", val_out)], "OUT")
    if val_out:
        storage.check_disjoint(val_out, [("SRC", src_path), ("--stats-from", stats_from)], "--val-out")
    stats: AffineMap | None = None
    if stats_from:
        ref = open_dataset(stats_from)
        ref_pre = ref.attrs.get("preprocess", {})
        pre = Preprocess(ref_pre.get("kind", "none"), ref_pre.get("strength", 0.1))
        stats = ref.affine
        stats_from = ref.fingerprint

    source = open_source(src, format, size)
    try:
        if len(source) == 0:
            raise InputError(f"{src}: no rows to ingest")
        if store_dtype == "uint8" and not source.uint8:
            raise InputError(f"--store-dtype uint8 keeps 8-bit pixels, but {src} gives float pixels (a float array, "
                             "or an in-memory array resized with --resize); use --store-dtype float16 or float32")
        if isinstance(source, ImageFolderSource):
            source.check_sizes()
        if stats is not None:
            ref_shape = ref.input_shape
            if ref_shape != tuple(source.row_shape):
                raise InputError(
                    f"--stats-from store has rows of shape {ref_shape} but {src} gives {tuple(source.row_shape)}; "
                    "use the same --resize"
                )
        idx = np.arange(len(source))
        if limit is not None:
            idx = balanced_subset(source.labels, limit, seed)
        val_idx = np.zeros(0, np.int64)
        if val_fraction > 0:
            tr, va = stratified_split(source.labels[idx], val_fraction, seed)
            idx, val_idx = idx[tr], idx[va]
        if shuffle:
            idx = idx[mixed_order(source.labels[idx], seed)]
            val_idx = val_idx[mixed_order(source.labels[val_idx], seed + 1)]
        plan = ingest_plan(source, idx, pre, stats, stats_from, augment, store_dtype)
        done = _completed(out, plan, overwrite, val_out)
        if done is not None:  # killed while writing --val-out: OUT itself is complete
            summary, affine = done
        else:
            summary = _write_store(out, source, idx, pre, stats, stats_from, augment, progress, "ingest", overwrite,
                                   store_dtype, plan)
            affine = summary.pop("_affine")
        if val_out:
            val_plan = ingest_plan(source, val_idx, pre, affine, summary["fingerprint"], None, store_dtype)
            val = _write_store(val_out, source, val_idx, pre, affine, summary["fingerprint"], None, progress, "val",
                               overwrite, store_dtype, val_plan)
            val.pop("_affine")
            summary["val"] = val
    finally:
        if isinstance(source, ImageFolderSource):
            source.close()
    summary["source"] = source.name
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("ingested %d rows from %s into %s in %.1f s", summary["n"], src, out, summary["seconds"])
    return summary
