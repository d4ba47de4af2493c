"""Preprocessing: the affine map pixels -> model inputs, and its statistics computed out of core with dask.

Pixel data in uint8 is scaled to [0, 1] before preprocessing (:func:`pixels_as_float`); float arrays are taken as
they are. Preprocessing is an affine map of flattened pixels, ``x = (p - mean) * scale`` (standardize, per
channel) or ``x = (p - mean) @ matrix`` (ZCA), so it can be inverted (:meth:`AffineMap.invert`) to view rows and
to attack in pixel space. Its statistics are computed out of core with dask over the store's own rows, unless
``stats_from`` names another store (validation/test splits).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from kernelscale.errors import InputError


def pixels_as_float(pixels: np.ndarray) -> np.ndarray:
    """float32 pixels: uint8 values scaled to [0, 1] (``u / 255`` in float32), floats as they are."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    return np.asarray(pixels, np.float32)


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

    def invert(self, inputs: Any, traceable: bool = False) -> Any:
        """Map model inputs (n, H, W, C) back to pixels, unclipped (for viewing and pixel-space attacks).

        Default: float32 numpy pixels, ZCA's inverse applied in float64. ``traceable``: jax (or numpy) arrays in
        and out, all in float32 (jax computes without float64), so it runs inside ``jax.jit`` (adversarial KIP).
        """
        if self.mean is None:
            return inputs
        if self.matrix is None:
            pixels = inputs / self.scale + self.mean
            return pixels if traceable else pixels.astype(np.float32)
        n, shape = inputs.shape[0], inputs.shape[1:]
        inverse = np.linalg.inv(self.matrix.astype(np.float64))
        if traceable:
            return (inputs.reshape(n, -1) @ inverse.astype(np.float32) + self.mean).reshape((n, *shape))
        flat = np.asarray(inputs, np.float64).reshape(n, -1) @ inverse
        return (flat + self.mean).reshape((n, *shape)).astype(np.float32)

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
