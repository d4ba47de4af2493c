"""Tile geometry and planning: the tile grid of a Gram, default and checked tile sides, which tiles to compute
in what order, and how a tile splits into kernel calls.

The plan holds only the pending tiles, grouped by row band (a dict of deques of column indices), so planning
the 49,141 tiles of an ImageNet Gram (N = 1.28M, tile 4096) takes well under a second and a few MB.
Scheduling hands each worker the next tile of the row band it already holds (its row block stays cached;
only the column block is new), a fresh band when its own is finished, and finally steals from the end of
the longest remaining band, so all workers stay busy to the last tile.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from kernelscale.errors import InputError

log = logging.getLogger(__name__)

MAX_TILE = 4096
MIN_TILE = 256


def bands(length: int, tile: int) -> int:
    """Number of tile bands of side ``tile`` covering ``length`` rows (the last one may be shorter)."""
    return -(-length // tile)


@dataclass(frozen=True)
class TileGrid:
    """The tile plan of an (N, M) matrix with square tiles of side T; edge tiles are smaller."""

    n: int
    m: int
    tile: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(row tiles, column tiles)."""
        return (bands(self.n, self.tile), bands(self.m, self.tile))

    def bounds(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Row and column ranges (r0, r1, c0, c1) of tile (i, j)."""
        t = self.tile
        return i * t, min(self.n, (i + 1) * t), j * t, min(self.m, (j + 1) * t)

    def stored(self, i: int, j: int) -> bool:
        """Whether tile (i, j) is stored (symmetric stores keep only i <= j)."""
        return not self.symmetric or i <= j

    def is_tile(self, i: int, j: int) -> bool:
        """Whether (i, j) is a stored tile of this grid (in range, and i <= j for symmetric grids)."""
        rows, cols = self.shape
        return 0 <= i < rows and 0 <= j < cols and self.stored(i, j)

    def covering(self, r0: int, r1: int, c0: int, c1: int) -> Iterator[tuple[int, int]]:
        """All tiles (i, j), stored or mirrored, that rows r0:r1 and columns c0:c1 touch, row-major."""
        t = self.tile
        for i in range(r0 // t, -(-r1 // t)):
            for j in range(c0 // t, -(-c1 // t)):
                yield i, j

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Stored tiles in row-major order (generated lazily: 49,000+ tiles cost no memory)."""
        rows, cols = self.shape
        for i in range(rows):
            for j in range(i if self.symmetric else 0, cols):
                yield i, j

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * (rows + 1) // 2 if self.symmetric else rows * cols


def default_tile(n: int, m: int, symmetric: bool) -> int:
    """Tile side: at most 4096, at least 4 tile bands along the longer side (min 256), and balanced.

    The bands are made equal (10,000 rows give 5 tiles of 2000, not 4 of 2048 and one of 1808), rounded up to
    a multiple of 8, so edge tiles waste no padded kernel work; never longer than the matrix (a 12-row dataset
    gets one 12 x 12 tile).
    """
    length = max(n, m, 1)
    cap = MAX_TILE
    while cap > MIN_TILE and bands(length, cap) < 4:
        cap //= 2
    tile = -(-length // bands(length, cap))
    return min(length, max(8, tile + (-tile % 8)))


def default_sub_block(tile: int, symmetric: bool) -> int:
    """Kernel-call side for a tile, before the memory cap: half a tile for symmetric Grams (tile >= 512).

    A diagonal tile then takes 3 calls instead of the 4 a whole-tile call costs (the lower half is mirrored);
    calls of 1000 x 1000 pairs run at the same cost per entry as 2000 x 2000 here (measured, fc NTK).
    """
    if symmetric and tile >= 512:
        half = -(-tile // 2)
        return half + (-half % 8)
    return tile


def check_tile(tile: int, n: int, m: int, dtype: str, available_bytes: int) -> None:
    """Refuse a tile side below 1, above the matrix's longer side, or whose tile buffers (three per worker: the
    tile computed, the one being written, the store's encode copy) exceed ``available_bytes`` of RAM."""
    if not isinstance(tile, (int, np.integer)) or tile < 1:
        raise InputError(f"--tile must be an integer >= 1, got {tile}")
    if tile > max(n, m, 8):  # (the default tile is a multiple of 8, at least 8)
        raise InputError(f"--tile {tile} is larger than the matrix ({n} x {m}); use --tile {max(n, m)} or less "
                         "(or leave it out for the default)")
    need = 3 * tile * tile * np.dtype(dtype).itemsize
    if need > available_bytes:
        raise InputError(f"--tile {tile} needs {need / 2**30:.1f} GiB per worker for its tile buffers but "
                         f"{available_bytes / 2**30:.1f} GiB are available; use a smaller --tile")


class TilePlan:
    """Pending tiles of a grid, handed out band by band (see module docstring)."""

    def __init__(self, grid: TileGrid, done: Iterable[tuple[int, int]] = (),
                 selection: Iterable[tuple[int, int]] | None = None, max_tiles: int | None = None):
        done_set = set(done)
        rows: dict[int, deque[int]] = {}
        count = 0
        source = grid if selection is None else sorted(set(selection))
        for i, j in source:
            if (i, j) in done_set and selection is None:
                continue
            if max_tiles is not None and count >= max_tiles:
                break
            rows.setdefault(i, deque()).append(j)
            count += 1
        self.grid = grid
        self.rows = rows
        self.unclaimed: deque[int] = deque(sorted(rows))
        self.total = count
        self.remaining = count

    def __len__(self) -> int:
        return self.remaining

    def tiles(self) -> set[tuple[int, int]]:
        """The tiles not yet handed out."""
        return {(i, j) for i, band in self.rows.items() for j in band}

    def next(self, row: int | None) -> tuple[int, int] | None:
        """The next tile for a worker whose cached row band is ``row`` (None: any), or None when done."""
        if self.remaining == 0:
            return None
        if row is not None and self.rows.get(row):
            return self._pop(row, left=True)
        while self.unclaimed:
            i = self.unclaimed.popleft()
            if self.rows.get(i):
                return self._pop(i, left=True)
        longest = max((i for i in self.rows if self.rows[i]), key=lambda i: len(self.rows[i]))
        return self._pop(longest, left=False)

    def push_back(self, tile: tuple[int, int]) -> None:
        """Return a tile whose computation failed, to be handed out again."""
        i, j = tile
        self.rows.setdefault(i, deque()).appendleft(j)
        self.remaining += 1

    def _pop(self, i: int, left: bool) -> tuple[int, int]:
        band = self.rows[i]
        j = band.popleft() if left else band.pop()
        if not band:
            del self.rows[i]
        self.remaining -= 1
        return i, j


def tile_entries(grid: TileGrid, tile: tuple[int, int]) -> int:
    """Kernel entries stored in one tile."""
    r0, r1, c0, c1 = grid.bounds(*tile)
    return (r1 - r0) * (c1 - c0)


def sub_block_size(tile: int, bytes_per_pair: int, memory_budget: int, cap: int = 2048) -> int:
    """Side ``s`` of the square kernel calls a tile is split into: ``s*s*bytes_per_pair <= memory_budget``.

    Capped at ``cap`` and at the tile; a multiple of 8 when above 8. Returns 0 when not even one pair fits.
    """
    s = int(math.isqrt(max(0, memory_budget // max(1, bytes_per_pair))))
    s = min(s, tile, cap)
    if s > 8:
        s -= s % 8
    return s


def sub_blocks(n_rows: int, n_cols: int, s: int, diagonal: bool) -> list[tuple[int, int]]:
    """Offsets (a, b) of the s x s kernel calls covering an n_rows x n_cols tile.

    For a diagonal tile of a symmetric Gram only calls with a <= b are made; the rest is mirrored.
    """
    return [(a, b) for a in range(0, n_rows, s) for b in range(0, n_cols, s) if not diagonal or a <= b]
