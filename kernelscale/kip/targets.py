"""Data for KIP: class-balanced target batches read from a dataset store, support initialisation
(class-balanced random rows, or randomized pivoted Cholesky over a stored Gram), and the label-solve floor.

Target batches are a pure function of ``(seed, step)``: a resumed run, every shard of a sharded run and an
uninterrupted run all see the same rows. Two ways to draw them (``--target-sampling``):

- ``rows``: every class's rows drawn at random, the same count per class. A dataset that fits ``memory_limit``
  bytes is read into memory once; a larger one is read row by row (``DatasetStore.take``), which reads a
  whole chunk of the store for almost every row (the bytes read are ~rows-per-chunk times those used).
- ``chunks`` (the default for a dataset larger than ``memory_limit``): each step reads a group of whole chunks
  (:class:`ChunkPlan`) and takes its rows from them, as evenly over classes as the group allows, so a step
  reads at most twice the bytes it uses. Groups follow a seeded permutation of the chunks per epoch, so every
  chunk is read equally often. The batch holds every class only when the store's rows mix classes
  (ImageFolder rows are stored class by class: there a group covers a few classes).

The next batch is prefetched in a thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from typing import Iterator

import numpy as np

from kernelscale.data import DatasetStore
from kernelscale.errors import InputError, StoreError
from kernelscale.gram.operators import ZarrGramOperator
from kernelscale.gram.store import GramStore
from kernelscale.kernels import KernelSpec
from kernelscale.kip.augment import TargetAugment
from kernelscale.kip.step import solve_labels
from kernelscale.linalg.operators import PrincipalSubmatrix
from kernelscale.linalg.preconditioners import rpcholesky
from kernelscale.linalg.ridge import ridge

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = 4 << 30  # bytes of DATA x held in RAM by each sampler (larger data is read from the store)
SAMPLING_MODES = ("auto", "rows", "chunks")


def class_rows(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Row indices of each class (sorted)."""
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def balanced_counts(total: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split over classes as evenly as possible; the remainder goes to randomly chosen classes."""
    counts = np.full(num_classes, total // num_classes, np.int64)
    counts[rng.choice(num_classes, total % num_classes, replace=False)] += 1
    return counts


def sampling_mode(requested: str, data: DatasetStore, memory_limit: int = DEFAULT_MEMORY_LIMIT) -> str:
    """``rows`` or ``chunks`` for a ``--target-sampling`` value: ``auto`` is ``chunks`` when DATA's float32 rows
    do not fit ``memory_limit`` bytes, else ``rows``."""
    if requested not in SAMPLING_MODES:
        raise InputError(f"--target-sampling must be {', '.join(SAMPLING_MODES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "chunks" if data.n * int(np.prod(data.input_shape)) * 4 > memory_limit else "rows"


def spread(total: int, available: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``total`` slots over classes as evenly as possible without exceeding ``available`` (C,): counts (C,).

    Water-filling: every class gets the same share, classes short of it give their remainder to the others;
    the last few slots go to randomly chosen classes.
    """
    counts = np.zeros(len(available), np.int64)
    left = min(int(total), int(available.sum()))
    open_ = available > 0
    while left > 0 and open_.any():
        share = max(1, left // int(open_.sum()))
        add = np.where(open_, np.minimum(share, available - counts), 0)
        if add.sum() > left:  # the last slots: one each to the first classes still open
            add = np.zeros_like(add)
            add[rng.choice(np.flatnonzero(open_), left, replace=False)] = 1
        counts += add
        left -= int(add.sum())
        open_ = counts < available
    return counts


class ChunkPlan:
    """Which rows the ``chunks`` sampling takes at each step, from the chunk grid of x and the labels alone.

    Chunks of R = ``rows_per_chunk`` rows are visited in groups of ``m = max(1, 2B // R)`` chunks (P = m R
    rows) along a seeded permutation of the chunks per epoch; each group serves ``k = ceil(P / 2B)``
    consecutive steps with disjoint rows (k > 1 only when a chunk holds more than 2B rows). From a group,
    ``k * B`` rows are taken as evenly over its classes as it allows (:func:`spread`; the unused half of the
    group is the slack that balances them), in a seeded order that interleaves the classes, and step ``i`` of
    the group takes the ``i``-th run of ``B``. Rows read per step: P / k, between B and 2B (a group holding
    the store's short last chunk takes one chunk more).
    """

    def __init__(self, labels: np.ndarray, num_classes: int, rows_per_chunk: int, batch: int, seed: int):
        self.labels, self.num_classes = labels, num_classes
        self.n, self.rows_per_chunk, self.batch, self.seed = len(labels), int(rows_per_chunk), int(batch), int(seed)
        self.n_chunks = -(-self.n // self.rows_per_chunk)
        self.m = max(1, min(self.n_chunks, 2 * self.batch // self.rows_per_chunk))
        self.k = max(1, -(-self.m * self.rows_per_chunk // (2 * self.batch)))
        self.groups = max(1, self.n_chunks // self.m)  # per epoch; the chunks left over join the next permutation
        self._last: tuple[int, np.ndarray] | None = None  # the last group's rows: its k steps reuse them

    def chunks(self, visit: int) -> np.ndarray:
        """Chunk indices of group visit ``visit`` (sorted)."""
        epoch, j = divmod(int(visit), self.groups)
        perm = np.random.default_rng([self.seed, 0x63686E6B, epoch]).permutation(self.n_chunks)
        group = perm[j * self.m : (j + 1) * self.m]
        short = self.n % self.rows_per_chunk  # rows of the last chunk, when it is not full
        if short and self.n_chunks - 1 in group and (len(group) - 1) * self.rows_per_chunk + short < self.k * self.batch:
            spare = [c for c in perm if c not in group][:1]  # one more chunk, so the group has k * B rows
            group = np.concatenate([group, np.asarray(spare, group.dtype)])
        return np.sort(group)

    def group_rows(self, visit: int) -> np.ndarray:
        """The ``k * B`` rows of group visit ``visit``, classes interleaved (fewer when the group is smaller)."""
        last = self._last
        if last is not None and last[0] == visit:
            return last[1]
        rows = np.concatenate([np.arange(c * self.rows_per_chunk, min(self.n, (c + 1) * self.rows_per_chunk))
                               for c in self.chunks(visit)])
        rng = np.random.default_rng([self.seed, 0x67726F7570, int(visit)])
        labels = self.labels[rows]
        counts = spread(self.k * self.batch, np.bincount(labels, minlength=self.num_classes), rng)
        by_class = np.lexsort((rng.random(len(rows)), labels))  # each class's rows in a random order
        cls = labels[by_class]
        rank = np.arange(len(rows)) - np.searchsorted(cls, cls)  # position within its class
        keep = rank < counts[cls]
        picked_rows, cls, rank = rows[by_class][keep], cls[keep], rank[keep]
        key = (rank + rng.random(len(rank))) / counts[cls]  # each class spread evenly along the run
        order = picked_rows[np.argsort(key, kind="stable")]
        self._last = (int(visit), order)
        return order

    def indices(self, step: int) -> np.ndarray:
        """Row indices of the batch of ``step``, sorted (B of them; repeated rows only if DATA has fewer)."""
        visit, i = divmod(int(step), self.k)
        order = self.group_rows(visit)
        take = (np.arange(self.batch) + i * self.batch) % len(order)
        return np.sort(order[take])


class TargetSampler:
    """Class-balanced target batches of ``batch`` rows from a dataset store; ``batch(step)`` is deterministic.

    ``mode`` ``rows``: rows within a class are drawn without replacement (with replacement only if a class has
    fewer rows than its share). ``chunks``: rows come from a few whole chunks per step (:class:`ChunkPlan`),
    read from the store. Targets are centred one-hot labels (one-hot minus 1/C), float32 (B, C). ``augment``
    translates and flips the rows (drawn for the whole batch from ``(seed, step)`` before it is split into
    parts). ``bytes_read`` counts the stored bytes of the chunks read for batches (after the in-memory load).
    """

    def __init__(self, data: DatasetStore, batch: int, seed: int, memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 augment: TargetAugment | None = None, mode: str = "rows"):
        if batch < 1:
            raise InputError(f"--target-batch must be >= 1, got {batch}")
        self.data = data
        self.batch_size = int(batch)
        self.seed = int(seed)
        self.num_classes = data.num_classes
        self.augment = augment or TargetAugment()
        self.mode = sampling_mode(mode, data, memory_limit)
        self.by_class = class_rows(data.labels, self.num_classes)
        self.rows_per_chunk = int(data.x.chunks[0])
        self.chunk_bytes = self.rows_per_chunk * int(np.prod(data.input_shape)) * data.x.dtype.itemsize
        self.plan = ChunkPlan(data.labels, self.num_classes, self.rows_per_chunk, batch, seed) \
            if self.mode == "chunks" else None
        self.bytes_read = 0
        self.rows_read = 0
        self._chunks: dict[int, np.ndarray] = {}  # stored rows of the current group's chunks (``chunks`` mode)
        nbytes = data.n * int(np.prod(data.input_shape)) * 4
        self.x_in_memory: np.ndarray | None = None
        self._x_padded: np.ndarray | None = None  # in-memory rows with the translation margin, when augmenting
        in_memory = nbytes <= memory_limit and data.n > 0 and self.mode == "rows"
        if in_memory and self.augment.shift:
            # padded once: each batch is then one gather + crop per translation instead of a pad per batch
            s, (h, w, c) = self.augment.shift, data.input_shape
            self._x_padded = np.empty((data.n, h + 2 * s, w + 2 * s, c), np.float32)
            for start, rows in data.iter_rows(8192):
                self._x_padded[start : start + len(rows)] = self.augment.pad(rows)
            self.x_in_memory = self._x_padded[:, s:-s, s:-s]
        elif in_memory:
            self.x_in_memory = np.concatenate([rows for _, rows in data.iter_rows(8192)])
        log.info("target sampler: %d rows, %s", data.n, "in memory" if self.x_in_memory is not None else
                 f"read by {self.mode}")

    def indices(self, step: int) -> np.ndarray:
        """Row indices of the target batch of ``step`` (class-grouped order; sorted with ``chunks``)."""
        if self.plan is not None:
            return self.plan.indices(step)
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
        if self.x_in_memory is not None:
            x = self.x_in_memory[idx]
        else:
            x = self.data.take(idx)  # zarr reads every chunk the rows touch, once, whole
            self.bytes_read += len(np.unique(np.asarray(idx) // self.rows_per_chunk)) * self.chunk_bytes
            self.rows_read += len(idx)
        return x, self.data.one_hot(idx)

    def batch(self, step: int, part: int = 0, parts: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The target batch of ``step``, or its ``part``-th of ``parts`` contiguous slices (for shards).

        Augmented batches come in :meth:`TargetAugment.grouping` order (same rows, another order); with
        ``chunks`` the slices are contiguous in row order (each shard reads only its own chunks) and grouped
        within each slice."""
        idx = self.indices(step)
        if self.plan is not None:
            return self._chunk_batch(idx, step, part, parts)
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

    def _read_chunks(self, idx: np.ndarray, step: int) -> np.ndarray:
        """Model inputs of rows ``idx`` (sorted) from whole chunks, each read once for all the steps of its group
        (held until the group changes: at most 2B rows)."""
        assert self.plan is not None
        group = set(self.plan.chunks(int(step) // self.plan.k).tolist())
        for c in [c for c in self._chunks if c not in group]:
            del self._chunks[c]
        R = self.rows_per_chunk
        parts = []
        for c in np.unique(idx // R).tolist():
            if c not in self._chunks:
                self._chunks[c] = self.data.stored(c * R, min(self.data.n, (c + 1) * R))
                self.bytes_read += self.chunk_bytes
            parts.append(self._chunks[c][idx[idx // R == c] - c * R])
        self.rows_read += len(idx)
        if not parts:
            return np.zeros((0, *self.data.input_shape), np.float32)
        return self.data.model_inputs(np.concatenate(parts))

    def _chunk_batch(self, idx: np.ndarray, step: int, part: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
        params = self.augment.draw(len(idx), self.seed, step) if self.augment.active else None
        if parts > 1:
            keep = np.array_split(np.arange(len(idx)), parts)[part]
            idx, params = idx[keep], (params[keep] if params is not None else None)
        x, y = self._read_chunks(idx, step), self.data.one_hot(idx)
        if params is None:
            return x, y
        order = self.augment.grouping(params)
        return self.augment.apply(x[order], params[order]), y[order]

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


def _top_up(picked: np.ndarray, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``picked`` (m,) plus ``k - m`` unpicked rows of ``range(n)``, the first of one ``rng.permutation(n)``.

    The fallback once the residual is numerically exhausted (the rows picked span the rest): KIP needs ``k``.
    """
    if len(picked) >= k:
        return picked
    taken = set(picked.tolist())
    extra = [j for j in rng.permutation(n) if j not in taken][: k - len(picked)]
    return np.concatenate([picked, np.asarray(extra, np.int64)])


def init_gram(data: DatasetStore, gram: GramStore, ipc: int, seed: int) -> np.ndarray:
    """Row indices of a support chosen per class by randomized pivoted Cholesky over the stored Gram."""
    check_ipc(data, ipc)
    rng = np.random.default_rng([seed, 0x72706368])
    picks = []
    with ZarrGramOperator(gram, prefetch=0) as op:
        for rows in class_rows(data.labels, data.num_classes):
            pivots = rpcholesky(PrincipalSubmatrix(op, rows), ipc, rng, block=1).pivots
            picks.append(np.sort(rows[_top_up(pivots, len(rows), ipc, rng)]))
    return np.concatenate(picks)


# ----------------------------------------------------------------------------------------------------------
# Label-solve floor and full-data ceiling (from a stored Gram)
# ----------------------------------------------------------------------------------------------------------


def label_solve(data: DatasetStore, gram: GramStore, support_rows: np.ndarray, reg: float) -> dict[str, np.ndarray]:
    """The label-solve baseline: support rows fixed, labels solved in closed form against all of DATA.

    Reads K(DATA, support) from the stored Gram. Returns ``labels`` (n_s, C) float32 and the fitted train
    predictions ``train_pred`` (N, C).
    """
    with ZarrGramOperator(gram, prefetch=0) as op:
        k_ts = op.columns(support_rows)
    k_ss = k_ts[support_rows]
    labels = solve_labels(k_ts, data.one_hot(), k_ss, reg)
    lam = ridge(reg, np.trace(k_ss), len(support_rows))
    w = np.linalg.solve(k_ss + lam * np.eye(len(support_rows)), labels.astype(np.float64))
    return {"labels": labels, "train_pred": k_ts @ w}
