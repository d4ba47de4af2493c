"""Dataset stores: the layout, its checks on open, row reads as float32 model inputs, fingerprints.

A dataset store is a Zarr v3 group::

    x        float32 (N, H, W, C)  model inputs after preprocessing, chunked by rows, crc32c
             (store_dtype float16: the same in half precision; uint8: the raw pixels, preprocessed on read)
    labels   int64   (N,)
    preprocess/mean, preprocess/scale | preprocess/matrix   the affine map pixels -> inputs
    attrs    kernelscale="dataset", class_names, source, counts, input_shape, preprocess, fingerprint,
             store_dtype (absent: float32), ingest_plan, content_sha256

Reads (``DatasetStore.rows/take/iter_rows``) always return float32 model inputs, whatever the store dtype.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Sequence

import numpy as np
import zarr

from kernelscale import storage
from kernelscale.data.labels import one_hot
from kernelscale.data.preprocess import AffineMap, pixels_as_float
from kernelscale.errors import StoreError

FORMAT_VERSION = 1
#: Most classes a dataset may have (ImageNet-21k has 21,841): one-hot targets are N x C.
MAX_CLASSES = 100_000
FIX = "ingest the data again (`kernelscale ingest SRC OUT.zarr`)"
#: How x can be stored (``ingest --store-dtype``): float32 model inputs; float16 model inputs; uint8 raw
#: pixels with the preprocessing applied on read. Every read returns float32 model inputs.
STORE_DTYPES = ("float32", "float16", "uint8")


def check_layout(path: str, group: zarr.Group, attrs: dict[str, Any]) -> None:
    """Refuse a dataset store whose attributes or arrays differ from the layout in the module docstring."""
    req = storage.require
    req(path, attrs.get("format_version") == FORMAT_VERSION, "format_version", str(FORMAT_VERSION),
        attrs.get("format_version"), FIX)
    names = attrs.get("class_names")
    req(path, isinstance(names, list) and 1 <= len(names) <= MAX_CLASSES and all(isinstance(c, str) for c in names),
        "class_names", f"a list of 1..{MAX_CLASSES} strings", names, FIX)
    req(path, storage.is_int(attrs.get("n"), 0), "n", "an integer >= 0", attrs.get("n"), FIX)
    shape = attrs.get("input_shape")
    req(path, isinstance(shape, list) and len(shape) == 3 and all(storage.is_int(v, 1) for v in shape), "input_shape",
        "[H, W, C] with positive integers", shape, FIX)
    fp = attrs.get("fingerprint")
    req(path, isinstance(fp, str) and fp.startswith("sha256:"), "fingerprint", "a 'sha256:...' string", fp, FIX)
    pre = attrs.get("preprocess")
    kind = pre.get("kind") if isinstance(pre, dict) else None
    req(path, kind in ("none", "standardize", "zca"), "preprocess", "{kind: none|standardize|zca, ...}", pre, FIX)
    n, (h, w, c) = attrs["n"], shape
    d = h * w * c
    expected_pre = {"none": {}, "standardize": {"mean": (c,), "scale": (c,)}, "zca": {"mean": (d,), "matrix": (d, d)}}[kind]
    metas = storage.members(group, path)
    allowed = {"x", "labels", "preprocess"} | {f"preprocess/{k}" for k in expected_pre}
    storage.check_members(path, metas, lambda name, meta: name in allowed, FIX)
    dtype = attrs.get("store_dtype", "float32")  # stores written before compact storage hold float32
    req(path, dtype in STORE_DTYPES, "store_dtype", " or ".join(STORE_DTYPES), dtype, FIX)
    storage.check_array(path, "x", metas.get("x"), dtype=dtype, shape=(n, h, w, c), chunks=(None, h, w, c),
                        fill=0 if dtype == "uint8" else "NaN", fix=FIX)
    storage.check_array(path, "labels", metas.get("labels"), dtype="int64", shape=(n,), fill=-1, fix=FIX)
    for name, pshape in expected_pre.items():
        storage.check_array(path, f"preprocess/{name}", metas.get(f"preprocess/{name}"), dtype="float32",
                            shape=pshape, fill=0.0, checksum=False, fix=FIX)


class DatasetStore:
    """A dataset store opened for reading: rows of model inputs and labels, read on demand."""

    def __init__(self, path: str, group: zarr.Group):
        attrs = storage.checked_attrs(path, group, "dataset", check_layout)
        self.path = str(path)
        self.group = group
        self.attrs = attrs
        self.x: zarr.Array = group["x"]  # as stored: see store_dtype (rows/take/iter_rows give model inputs)
        self.store_dtype: str = attrs.get("store_dtype", "float32")
        self._labels: np.ndarray | None = None
        self._affine: AffineMap | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def labels(self) -> np.ndarray:
        """Class indices (N,), checked to lie in [0, num_classes) (a tampered store raises StoreError)."""
        if self._labels is None:
            labels = np.asarray(self.group["labels"][...], np.int64)
            bad = (labels < 0) | (labels >= self.num_classes)
            if bad.any():
                raise StoreError(
                    f"{self.path}: labels out of range: row {int(np.argmax(bad))} has label "
                    f"{int(labels[np.argmax(bad)])} but the store has {self.num_classes} classes "
                    f"(0..{self.num_classes - 1}); ingest the data again"
                )
            self._labels = labels
        return self._labels

    def check_rows(self, block: int = 4096) -> None:
        """Read every row once: raise StoreError naming the first row with NaN/Inf or a corrupt chunk.

        Used before expensive work on the rows (a Gram), so bad data is refused before any compute.
        """
        step = max(int(self.x.chunks[0]), (block // int(self.x.chunks[0])) * int(self.x.chunks[0]))
        for start in range(0, self.n, step):
            try:
                x = self.rows(start, min(self.n, start + step))
            except ValueError as exc:
                raise StoreError(f"{self.path}: rows {start}..{min(self.n, start + step) - 1} are corrupt "
                                 f"({exc}); ingest the data again") from exc
            bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            if bad.any():
                raise StoreError(f"{self.path}: rows have NaN/Inf values ({int(bad.sum())} rows from row {start} "
                                 f"on, first: row {start + int(np.argmax(bad))}); the store was altered after "
                                 "ingest: ingest the data again")

    def check_content(self, full: bool = False, samples: int = 2, seed: int = 0) -> None:
        """Raise StoreError when the rows, labels or preprocessing differ from what was ingested.

        Compares content hashes recorded at ingest: labels and preprocessing always, and the rows of the first,
        the last and ``samples`` random x chunks (cheap enough for every resume and solve), or with ``full`` every
        chunk and the fingerprint itself, hashed again (``kernelscale verify``). A store ingested before content
        hashes existed gets the full fingerprint check.
        """
        digests = self.attrs.get("content_sha256")
        labels = self.labels  # range-checked first: an out-of-range label gets its own message
        if not isinstance(digests, dict):
            if full or self.n * int(np.prod(self.input_shape)) * 4 <= 256 << 20:
                self._check_fingerprint(labels)
            return
        chunks = digests.get("x_chunks")
        rows = int(self.x.chunks[0])
        if not isinstance(chunks, list) or len(chunks) != -(-self.n // rows):
            raise StoreError(f"{self.path}: attribute 'content_sha256' does not cover the {-(-self.n // rows)} "
                             f"chunks of x; the store was altered after ingest: {FIX}")
        if content_digest(labels) != digests.get("labels"):
            raise StoreError(f"{self.path}: the labels differ from what was ingested (content hash mismatch); the "
                             f"store was altered after ingest: {FIX}")
        if self.affine.digest() != digests.get("affine"):
            raise StoreError(f"{self.path}: the preprocessing arrays differ from what was ingested (content hash "
                             f"mismatch); the store was altered after ingest: {FIX}")
        if full:
            picks = range(len(chunks))
        else:
            rng = np.random.default_rng(seed)
            picks = sorted({0, len(chunks) - 1, *rng.integers(0, len(chunks), size=samples).tolist()}) if chunks else []
        for k in picks:
            a, b = k * rows, min(self.n, (k + 1) * rows)
            try:
                values = self.stored(a, b)
            except ValueError as exc:
                raise StoreError(f"{self.path}: rows {a}..{b - 1} are corrupt ({exc}); {FIX}") from exc
            if content_digest(values) != chunks[k]:  # hashes of the stored values (uint8 pixels in a uint8 store)
                raise StoreError(f"{self.path}: rows {a}..{b - 1} differ from what was ingested (content hash of x "
                                 f"chunk {k} does not match); the store was altered after ingest: {FIX}")
        if full:
            self._check_fingerprint(labels)

    def _check_fingerprint(self, labels: np.ndarray) -> None:
        pre_json = self.attrs.get("preprocess")
        if fingerprint_rows(self.x, labels, pre_json, self.affine, self.store_dtype)[0] != self.fingerprint:
            raise StoreError(f"{self.path}: its rows, labels or preprocessing no longer match its fingerprint (hashed "
                             f"again); the store was altered after ingest: {FIX}")

    def stored(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored (``store_dtype``: model inputs, or uint8 pixels in a uint8 store)."""
        return np.asarray(self.x[start:stop])

    def model_inputs(self, stored: np.ndarray) -> np.ndarray:
        """float32 model inputs (k, H, W, C) of stored rows: uint8 pixels are scaled to [0, 1] and preprocessed
        exactly as ingest preprocesses them for a float32 store; float16 inputs are widened."""
        if self.store_dtype == "uint8":
            return np.asarray(self.affine.apply(pixels_as_float(stored)), np.float32)
        return np.asarray(stored, np.float32)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Model inputs of rows [start, stop) as float32 (stop - start, H, W, C)."""
        return self.model_inputs(self.stored(start, stop))

    def take(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Model inputs of arbitrary rows, in the order given (float32 (len(idx), H, W, C))."""
        idx = np.asarray(idx, np.int64)
        if idx.size == 0:
            return np.zeros((0, *self.input_shape), np.float32)
        order = np.argsort(idx)
        out = np.empty((len(idx), *self.input_shape), np.float32)
        out[order] = self.model_inputs(self.x.get_orthogonal_selection((idx[order],)))
        return out

    def iter_rows(self, block: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n, block):
            yield start, self.rows(start, min(self.n, start + block))

    def one_hot(self, idx: np.ndarray | None = None, centred: bool = True) -> np.ndarray:
        """Regression targets (N, C): one-hot labels, minus 1/C when ``centred``."""
        labels = self.labels if idx is None else self.labels[idx]
        return one_hot(labels, self.num_classes, centred)

    @property
    def affine(self) -> AffineMap:
        """The preprocessing map pixels -> model inputs (read once)."""
        if self._affine is None:
            self._affine = AffineMap.load(self.group)
        return self._affine

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "n": self.n,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "counts": self.attrs.get("counts"),
            "preprocess": self.attrs.get("preprocess"),
            "store_dtype": self.store_dtype,
            "fingerprint": self.fingerprint,
        }


def open_dataset(path: str) -> DatasetStore:
    """Open a dataset store written by :func:`ingest`."""
    if not storage.exists(path):
        raise StoreError(f"{path}: no dataset store there (create one with `kernelscale ingest SRC {path}`)")
    return DatasetStore(path, storage.open_group(path, "r"))


def fingerprint_rows(x: zarr.Array, labels: np.ndarray, pre_json: dict[str, Any], affine: AffineMap,
                 store_dtype: str = "float32") -> tuple[str, list[str]]:
    """The dataset fingerprint and the content hashes of x's chunks, from one read of the stored rows.

    The fingerprint hashes the stored values (widened to float32), labels, preprocessing and, for compact
    stores, the store dtype: stores of the same images in different dtypes never share a fingerprint (so
    neither do their Grams), and a float32 store keeps the fingerprint it always had.
    """
    h = hashlib.sha256()
    head = {"shape": list(x.shape), "preprocess": pre_json}
    if store_dtype != "float32":
        head["store_dtype"] = store_dtype
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(affine.digest().encode())
    rows = int(x.chunks[0])
    step = rows * max(1, 64 // max(1, rows) + 1)
    chunk_digests: list[str] = []
    for start in range(0, x.shape[0], step):
        values = np.asarray(x[start : start + step])
        h.update(np.ascontiguousarray(values, np.float32).tobytes())
        chunk_digests += [content_digest(values[a : a + rows]) for a in range(0, len(values), rows)]
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return "sha256:" + h.hexdigest(), chunk_digests


def content_digest(values: np.ndarray) -> str:
    """sha256 (first 32 hex digits) of an array's bytes: the per-chunk content hashes of a dataset store."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:32]
