"""Tile planning: which tiles to compute, in what order, and how a tile splits into kernel calls.

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
from typing import Iterable

from kernelscale.gram.store import TileGrid

log = logging.getLogger(__name__)


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
