"""Gram-store operators: a stored Gram streamed tile by tile (``ZarrGramOperator``) or spread over Ray actors
(``RayGramOperator``). They implement ``kernelscale.linalg.LinearOperator``, so every solver runs on them.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
from typing import Any, Iterator, Sequence

import numpy as np

from kernelscale.errors import InputError, StoreError
from kernelscale.gram.store import open_gram
from kernelscale.linalg.operators import LinearOperator
from kernelscale.runtime import actor_options, cluster_slots, ensure_ray

log = logging.getLogger(__name__)


def _tile_products(
    tiles: Iterator[tuple[int, int, np.ndarray]], grid: Any, x: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Accumulate the product of stored tiles with x into out (float64), mirroring symmetric stores."""
    for i, j, tile in tiles:
        r0, r1, c0, c1 = grid.bounds(i, j)
        t = tile.astype(np.float64, copy=False)
        out[r0:r1] += t @ x[c0:c1]
        if grid.symmetric and i != j:
            out[c0:c1] += t.T @ x[r0:r1]
    return out


class ZarrGramOperator(LinearOperator):
    """A Gram store streamed tile by tile (out of core), the next ``prefetch`` tiles read in a thread.

    ``mm`` reads every stored tile once per call (a symmetric store's off-diagonal tiles count for both
    halves). Missing or corrupt tiles raise :class:`StoreError` from the read path of the store.
    Memory: ``prefetch + 1`` tiles plus the (N, k) and (M, k) blocks.
    """

    def __init__(self, store: Any, *, prefetch: int = 2, psd: bool = True):
        self.store = store
        self.grid = store.grid
        self.shape = store.shape
        self.symmetric = bool(store.symmetric)
        self.psd = psd and self.symmetric
        self.prefetch = max(0, int(prefetch))
        self._pool: cf.ThreadPoolExecutor | None = None
        self._diag: np.ndarray | None = None
        self.tiles_read = 0

    def _executor(self) -> cf.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=max(1, self.prefetch), thread_name_prefix="tile-prefetch")
        return self._pool

    def iter_tiles(self, order: Sequence[tuple[int, int]] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (i, j, tile) for the stored tiles (or ``order``), reading ahead in background threads."""
        order = list(self.grid) if order is None else list(order)
        if self.prefetch == 0:
            for i, j in order:
                self.tiles_read += 1
                yield i, j, self.store.read_tile(i, j)
            return
        pool = self._executor()
        pending: list[tuple[int, int, cf.Future]] = []
        pos = 0
        try:
            while pos < len(order) or pending:
                while pos < len(order) and len(pending) <= self.prefetch:
                    i, j = order[pos]
                    pending.append((i, j, pool.submit(self.store.read_tile, i, j)))
                    pos += 1
                i, j, fut = pending.pop(0)
                tile = fut.result()  # re-raises StoreError from the reading thread
                self.tiles_read += 1
                yield i, j, tile
        finally:
            for _, _, fut in pending:
                fut.cancel()

    def _mm(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((self.shape[0], x.shape[1]))
        return _tile_products(self.iter_tiles(), self.grid, x, out)

    def diag(self) -> np.ndarray:
        if self._diag is None:
            self._diag = np.asarray(self.store.diag(), np.float64)
        return self._diag.copy()

    def columns(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """K[:, idx], reading only the tiles of the tile columns that hold those indices (each tile once)."""
        idx = np.asarray(idx, np.int64)
        out = np.empty((self.shape[0], len(idx)))
        t = self.grid.tile
        col_tiles = {int(j) for j in np.unique(idx // t)} if len(idx) else set()
        order: dict[tuple[int, int], None] = {}
        for j in sorted(col_tiles):
            for i in range(self.grid.shape[0]):
                order[(i, j) if self.grid.stored(i, j) else (j, i)] = None
        for a, b, tile in self.iter_tiles(list(order)):
            # tile (a, b) serves column tile b as stored and, in a symmetric store, column tile a mirrored
            views = [(a, b, tile)] + ([(b, a, tile.T)] if self.symmetric and a != b else [])
            for rt, ct, block in views:
                if ct not in col_tiles:
                    continue
                r0, r1, c0, c1 = self.grid.bounds(rt, ct)
                sel = np.flatnonzero((idx >= c0) & (idx < c1))
                out[r0:r1, sel] = block[:, idx[sel] - c0]
        return out

    def submatrix(self, rows: Sequence[int] | np.ndarray, cols: Sequence[int] | np.ndarray) -> np.ndarray:
        """K[rows][:, cols] (any index order) as float64, one streaming pass over the tiles that hold them."""
        rows = np.asarray(rows, np.int64)
        cols = np.asarray(cols, np.int64)
        out = np.full((len(rows), len(cols)), np.nan)
        t = self.grid.tile
        need_r, need_c = set((rows // t).tolist()), set((cols // t).tolist())
        order = [(i, j) for i, j in self.grid
                 if (i in need_r and j in need_c) or (self.symmetric and j in need_r and i in need_c)]
        for a, b, tile in self.iter_tiles(order):
            views = [(a, b, tile)] + ([(b, a, tile.T)] if self.symmetric and a != b else [])
            for rt, ct, block in views:
                r0, r1, c0, c1 = self.grid.bounds(rt, ct)
                pr = np.flatnonzero((rows >= r0) & (rows < r1))
                pc = np.flatnonzero((cols >= c0) & (cols < c1))
                if len(pr) and len(pc):
                    out[np.ix_(pr, pc)] = block[np.ix_(rows[pr] - r0, cols[pc] - c0)]
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ----------------------------------------------------------------------------------------------------------
# Ray: actors own row blocks of tiles
# ----------------------------------------------------------------------------------------------------------


def _assign_tile_rows(rows: int, symmetric: bool, workers: int) -> list[list[int]]:
    """Tile rows per worker, balanced by stored-tile count (symmetric rows shrink: greedy largest-first)."""
    work = [(rows - i if symmetric else 1, i) for i in range(rows)]
    loads = [0] * workers
    owned: list[list[int]] = [[] for _ in range(workers)]
    for cost, i in sorted(work, reverse=True):
        w = int(np.argmin(loads))
        loads[w] += cost
        owned[w].append(i)
    return [sorted(o) for o in owned if o]


class _RowBlockWorker:
    """Ray actor body: owns some tile rows of a Gram store; holds their tiles in memory if they fit."""

    def __init__(self, path: str, tile_rows: list[int], memory_bytes: int):
        self.store = open_gram(path, "r")
        grid = self.store.grid
        self.tiles = [(i, j) for i in tile_rows for j in range(i if grid.symmetric else 0, grid.shape[1])]
        need = sum((grid.bounds(i, j)[1] - grid.bounds(i, j)[0]) * (grid.bounds(i, j)[3] - grid.bounds(i, j)[2])
                   for i, j in self.tiles) * self.store.dtype.itemsize
        self.cached: dict[tuple[int, int], np.ndarray] | None = None
        self.fits = need <= memory_bytes

    def _load(self) -> None:
        """Read the tiles into memory (in a task, not in __init__: a corrupt tile then reaches the driver as a
        StoreError task error instead of an opaque ActorDiedError of the creation task)."""
        if self.fits and self.cached is None:
            self.cached = {(i, j): self.store.read_tile(i, j) for i, j in self.tiles}

    def info(self) -> dict[str, Any]:
        self._load()
        return {"tiles": len(self.tiles), "in_memory": self.cached is not None}

    def mm(self, x: np.ndarray) -> np.ndarray:
        self._load()
        grid = self.store.grid
        out = np.zeros((grid.n, x.shape[1]))
        if self.cached is not None:
            tiles = ((i, j, self.cached[(i, j)]) for i, j in self.tiles)
        else:
            tiles = ((i, j, self.store.read_tile(i, j)) for i, j in self.tiles)
        return _tile_products(tiles, grid, x, out)


class RayGramOperator(LinearOperator):
    """A Gram store split by tile rows over Ray actors; each returns its partial product, summed here.

    Actors hold their tiles in memory when they fit in ``memory_per_worker`` bytes, else stream them from the
    store on every product. ``diag``/``columns`` read the store directly (they are one-off reads).
    """

    def __init__(self, store: Any, *, workers: int | None = None, memory_per_worker: int = 2 << 30,
                 address: str | None = None, gpus_per_worker: float = 0.0, psd: bool = True):
        import ray  # noqa: PLC0415

        self._ray_info = ensure_ray(address)
        self.store = store
        self.grid = store.grid
        self.shape = store.shape
        self.symmetric = bool(store.symmetric)
        self.psd = psd and self.symmetric
        workers = workers or cluster_slots(gpus_per_worker)
        plan = _assign_tile_rows(self.grid.shape[0], self.symmetric, max(1, workers))
        remote = ray.remote(_RowBlockWorker).options(**actor_options(gpus_per_worker))
        self._actors = [remote.remote(store.path, rows, int(memory_per_worker)) for rows in plan]
        self._local = ZarrGramOperator(store, prefetch=2, psd=psd)
        self.actor_info = self._get([a.info.remote() for a in self._actors])

    @staticmethod
    def _get(refs: list[Any]) -> list[Any]:
        import ray  # noqa: PLC0415

        try:
            ray.wait(refs, num_returns=len(refs))  # let every actor finish before an error is raised
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, StoreError):
                raise StoreError(str(cause)) from exc
            raise

    def _mm(self, x: np.ndarray) -> np.ndarray:
        import ray  # noqa: PLC0415

        ref = ray.put(x)
        parts = self._get([a.mm.remote(ref) for a in self._actors])
        out = np.zeros((self.shape[0], x.shape[1]))
        for p in parts:
            out += p
        return out

    def diag(self) -> np.ndarray:
        return self._local.diag()

    def columns(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._local.columns(idx)

    def close(self) -> None:
        import ray  # noqa: PLC0415

        for a in getattr(self, "_actors", []):
            ray.kill(a)
        self._actors = []
        self._local.close()
