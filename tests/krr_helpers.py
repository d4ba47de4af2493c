"""Test helpers: Gram stores written from numpy matrices (no engine needed), small SPD test matrices."""

from __future__ import annotations

import json

import numpy as np

from kernelscale.gram.store import GramStore, create_gram, gram_fingerprint


def write_gram(path: str, matrix: np.ndarray, *, tile: int, dtype: str = "float64", symmetric: bool | None = None,
               data_fingerprint: str = "sha256:data", against_fingerprint: str | None = None,
               spec: dict | None = None) -> GramStore:
    """A complete Gram store holding ``matrix`` (symmetric stores keep the upper triangle of tiles)."""
    n, m = matrix.shape
    if symmetric is None:
        symmetric = against_fingerprint is None and n == m
    spec = spec or {"arch": "fc", "params": {"depth": 1}, "kernel": "ntk"}
    spec_json = json.dumps(spec, sort_keys=True)
    fp = gram_fingerprint(spec_json, dtype, data_fingerprint, against_fingerprint, {"test": "1"})
    store = create_gram(path, n=n, m=m, tile=tile, dtype=dtype, symmetric=symmetric,
                        attrs={"spec": spec, "fingerprint": fp, "data_fingerprint": data_fingerprint,
                               "against_fingerprint": against_fingerprint, "versions": {"test": "1"}})
    for i, j in store.grid:
        r0, r1, c0, c1 = store.grid.bounds(i, j)
        store.write_tile(i, j, matrix[r0:r1, c0:c1])
    return store


def pairwise_gram(spec_text: str, x1: np.ndarray, x2: np.ndarray | None = None) -> np.ndarray:
    """The kernel matrix of a spec (e.g. ``fc:depth=3``) through kernels.pairwise, as float64 numpy."""
    from kernelscale.kernels import pairwise, parse_arch

    f = pairwise(parse_arch(spec_text))
    return np.asarray(f(x1, x1 if x2 is None else x2), np.float64)


def spd_matrix(n: int, cond: float = 1e3, seed: int = 0) -> np.ndarray:
    """A symmetric positive definite matrix with eigenvalues log-spaced in [1/cond, 1]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0, -np.log10(cond), n)
    m = (q * lam) @ q.T
    return 0.5 * (m + m.T)


def small_split_with_grams(root, arch: str = "fc:depth=2") -> dict:
    """40 rows of 4x4x1 in 3 classes, their Gram (``arch``) and a 12-row test split with its cross Gram, under
    ``root`` (a pathlib.Path): the paths, the images, the labels and the spec."""
    from kernelscale import parse_arch
    from kernelscale.data import open_dataset

    from fault_helpers import npz_store, synthetic_images

    images = synthetic_images(52, seed=3)
    labels = np.arange(52) % 3
    train = npz_store(root, "train", images[:40], labels[:40])
    test = npz_store(root, "test", images[40:], labels[40:])
    tr, te = open_dataset(train), open_dataset(test)
    spec = parse_arch(arch).to_json()
    gram, cross = str(root / "gram.zarr"), str(root / "cross.zarr")
    xtr, xte = tr.rows(0, tr.n), te.rows(0, te.n)
    write_gram(gram, pairwise_gram(arch, xtr), tile=16, data_fingerprint=tr.fingerprint, spec=spec)
    write_gram(cross, pairwise_gram(arch, xte, xtr), tile=16, data_fingerprint=te.fingerprint,
               against_fingerprint=tr.fingerprint, spec=spec)
    return {"root": root, "images": images, "labels": labels, "train": train, "test": test, "gram": gram,
            "cross": cross, "spec": spec}
