"""Data for KIP: class-balanced target batches read from a dataset store, support initialisation
(class-balanced random rows, or randomized pivoted Cholesky over a stored Gram), and the label-solve floor.

Target batches are a pure function of ``(seed, step)``: a resumed run, every shard of a sharded run and an
uninterrupted run all see the same rows. A dataset that fits ``memory_limit`` bytes is read into memory once;
a larger one is read row by row (``DatasetStore.take``) with the next batch prefetched in a thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Iterator

import numpy as np

from .data import DatasetStore
from .errors import InputError, StoreError
from .gram_store import GramStore
from .target_augment import TargetAugment

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = 4 << 30  # bytes of DATA x held in RAM by each sampler (larger data is read by rows)


def class_rows(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Row indices of each class (sorted)."""
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def balanced_counts(total: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split over classes as evenly as possible; the remainder goes to randomly chosen classes."""
    counts = np.full(num_classes, total // num_classes, np.int64)
    counts[rng.choice(num_classes, total % num_classes, replace=False)] += 1
    return counts


class TargetSampler:
    """Class-balanced target batches of ``batch`` rows from a dataset store; ``batch(step)`` is deterministic.

    Rows within a class are drawn without replacement (with replacement only if a class has fewer rows than
    its share). Targets are centred one-hot labels (one-hot minus 1/C), float32 (B, C). ``augment`` translates
    and flips the rows (drawn for the whole batch from ``(seed, step)`` before it is split into parts).
    """

    def __init__(self, data: DatasetStore, batch: int, seed: int, memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 augment: TargetAugment | None = None):
        if batch < 1:
            raise InputError(f"--target-batch must be >= 1, got {batch}")
        self.data = data
        self.batch_size = int(batch)
        self.seed = int(seed)
        self.num_classes = data.num_classes
        self.augment = augment or TargetAugment()
        self.by_class = class_rows(data.labels, self.num_classes)
        nbytes = data.n * int(np.prod(data.input_shape)) * 4
        self.x_in_memory: np.ndarray | None = None
        self._x_padded: np.ndarray | None = None  # in-memory rows with the translation margin, when augmenting
        in_memory = nbytes <= memory_limit and data.n > 0
        if in_memory and self.augment.shift:
            # padded once: each batch is then one gather + crop per translation instead of a pad per batch
            s, (h, w, c) = self.augment.shift, data.input_shape
            self._x_padded = np.empty((data.n, h + 2 * s, w + 2 * s, c), np.float32)
            for start, rows in data.iter_rows(8192):
                self._x_padded[start : start + len(rows)] = self.augment.pad(rows)
            self.x_in_memory = self._x_padded[:, s:-s, s:-s]
        elif in_memory:
            self.x_in_memory = np.concatenate([rows for _, rows in data.iter_rows(8192)])
        log.info("target sampler: %d rows, %s", data.n, "in memory" if self.x_in_memory is not None else "read by rows")

    def indices(self, step: int) -> np.ndarray:
        """Row indices of the target batch of ``step`` (class-grouped order)."""
        rng = np.random.default_rng([self.seed, 0x6B6970, int(step)])
        counts = balanced_counts(self.batch_size, self.num_classes, rng)
        parts = []
        for rows, k in zip(self.by_class, counts):
            if k == 0 or len(rows) == 0:
                continue
            parts.append(rng.choice(rows, size=k, replace=bool(k > len(rows))))
        return np.concatenate(parts)

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs (k, *shape) float32 and centred one-hot targets (k, C) float32 of rows ``idx``."""
        x = self.x_in_memory[idx] if self.x_in_memory is not None else self.data.take(idx)
        return x, self.data.one_hot(idx)

    def batch(self, step: int, part: int = 0, parts: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The target batch of ``step``, or its ``part``-th of ``parts`` contiguous slices (for shards).

        Augmented batches come in :meth:`TargetAugment.grouping` order (same rows, another order)."""
        idx = self.indices(step)
        params = None
        if self.augment.active:  # rows with the same translation made contiguous (the loss is a sum over rows)
            params = self.augment.draw(len(idx), self.seed, step)
            order = self.augment.grouping(params)
            idx, params = idx[order], params[order]
        if parts > 1:
            keep = np.array_split(np.arange(len(idx)), parts)[part]
            idx, params = idx[keep], (params[keep] if params is not None else None)
        if params is None:
            return self.read(idx)
        if self._x_padded is not None:
            return self.augment.crop(self._x_padded, idx, params), self.data.one_hot(idx)
        x, y = self.read(idx)
        return self.augment.apply(x, params), y

    def iterate(self, start: int, stop: int, part: int = 0, parts: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches of steps ``start..stop-1``, the next one read in a background thread while this one runs."""
        if start >= stop:
            return
        with cf.ThreadPoolExecutor(1) as pool:
            future = pool.submit(self.batch, start, part, parts)
            for step in range(start, stop):
                batch = future.result()
                if step + 1 < stop:
                    future = pool.submit(self.batch, step + 1, part, parts)
                yield batch


# ----------------------------------------------------------------------------------------------------------
# Support initialisation
# ----------------------------------------------------------------------------------------------------------


def check_ipc(data: DatasetStore, ipc: int) -> None:
    """Refuse an images-per-class count larger than the smallest class (before any compute)."""
    if ipc < 1:
        raise InputError(f"--ipc must be >= 1, got {ipc}")
    counts = np.bincount(data.labels, minlength=data.num_classes)
    small = int(np.argmin(counts))
    if ipc > counts[small]:
        raise InputError(
            f"--ipc {ipc} needs {ipc} rows of every class, but class {data.class_names[small]!r} has only "
            f"{int(counts[small])} rows in {data.path}; lower --ipc"
        )


def init_random(data: DatasetStore, ipc: int, seed: int) -> np.ndarray:
    """Row indices of a class-balanced random support: ``ipc`` rows per class, grouped by class."""
    check_ipc(data, ipc)
    rng = np.random.default_rng([seed, 0x696E6974])
    return np.concatenate([np.sort(rng.choice(rows, ipc, replace=False)) for rows in class_rows(data.labels, data.num_classes)])


def check_gram(gram: GramStore, data: DatasetStore, spec_canonical: str) -> None:
    """A Gram used for KIP must be the symmetric Gram of DATA itself, with the same kernel spec."""
    from .kernels import KernelSpec  # noqa: PLC0415

    if not gram.symmetric or gram.shape != (data.n, data.n):
        raise StoreError(
            f"{gram.path}: KIP needs the symmetric Gram of DATA ({data.n} x {data.n}), got a "
            f"{'symmetric' if gram.symmetric else 'cross'} Gram of shape {gram.shape}; "
            f"run `kernelscale gram {data.path}` with the same --arch/--kernel"
        )
    if gram.attrs.get("data_fingerprint") != data.fingerprint:
        raise StoreError(f"{gram.path} was computed from other data than {data.path} (dataset fingerprints differ)")
    theirs = KernelSpec.from_json(gram.attrs["spec"]).canonical()
    if theirs != spec_canonical:
        raise StoreError(f"{gram.path} holds another kernel ({theirs}) than requested ({spec_canonical})")


def read_columns(gram: GramStore, cols: np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
    """``K[rows, cols]`` (float64) for arbitrary column indices, reading each tile strip once, by row tiles."""
    cols = np.asarray(cols, np.int64)
    r0, r1 = rows or (0, gram.shape[0])
    out = np.empty((r1 - r0, len(cols)), np.float64)
    t = gram.tile
    for strip in np.unique(cols // t):
        sel = np.flatnonzero(cols // t == strip)
        c0, c1 = int(strip * t), int(min(gram.shape[1], (strip + 1) * t))
        for a in range(r0 - r0 % t, r1, t):
            a0, a1 = max(a, r0), min(a + t, r1)
            out[a0 - r0 : a1 - r0, sel] = gram.block((a0, a1), (c0, c1))[:, cols[sel] - c0]
    return out


def rpcholesky(gram: GramStore, candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Randomized pivoted Cholesky (Chen, Epperly, Tropp & Webber 2022) restricted to ``candidates``.

    Picks ``k`` rows, each sampled with probability proportional to the residual diagonal of the kernel
    restricted to the candidates: rows that best span them in the kernel's feature space. One column read each.
    """
    candidates = np.asarray(candidates, np.int64)
    lo, hi = int(candidates.min()), int(candidates.max()) + 1
    diag = gram.diag()[candidates].astype(np.float64)
    factor = np.zeros((len(candidates), k))
    picked: list[int] = []
    for i in range(k):
        total = diag.sum()
        p = int(rng.choice(len(candidates), p=diag / total)) if total > 0 else int(np.argmax(diag))
        col = read_columns(gram, candidates[p : p + 1], (lo, hi))[candidates - lo, 0]
        g = col - factor[:, :i] @ factor[p, :i]
        if g[p] <= 0:  # numerically exhausted: the remaining rows are spanned; fall back to an unpicked row
            p = int(next(j for j in rng.permutation(len(candidates)) if j not in picked))
            g[p] = max(g[p], 1e-12)
        factor[:, i] = g / np.sqrt(g[p])
        diag = np.maximum(diag - factor[:, i] ** 2, 0.0)
        diag[picked + [p]] = 0.0
        picked.append(p)
    return np.sort(candidates[picked])


def init_gram(data: DatasetStore, gram: GramStore, ipc: int, seed: int) -> np.ndarray:
    """Row indices of a support chosen per class by randomized pivoted Cholesky over the stored Gram."""
    check_ipc(data, ipc)
    rng = np.random.default_rng([seed, 0x72706368])
    return np.concatenate([rpcholesky(gram, rows, ipc, rng) for rows in class_rows(data.labels, data.num_classes)])


# ----------------------------------------------------------------------------------------------------------
# Label-solve floor and full-data ceiling (from a stored Gram)
# ----------------------------------------------------------------------------------------------------------


def label_solve(data: DatasetStore, gram: GramStore, support_rows: np.ndarray, reg: float) -> dict[str, np.ndarray]:
    """The label-solve baseline: support rows fixed, labels solved in closed form against all of DATA.

    Reads K(DATA, support) from the stored Gram. Returns ``labels`` (n_s, C) float32 and the fitted train
    predictions ``train_pred`` (N, C).
    """
    from .kip import solve_labels  # noqa: PLC0415

    k_ts = read_columns(gram, support_rows)
    k_ss = k_ts[support_rows]
    labels = solve_labels(k_ts, data.one_hot(), k_ss, reg)
    lam = reg * np.trace(k_ss) / len(support_rows)
    w = np.linalg.solve(k_ss + lam * np.eye(len(support_rows)), labels.astype(np.float64))
    return {"labels": labels, "train_pred": k_ts @ w}
