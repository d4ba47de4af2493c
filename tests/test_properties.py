"""Property tests (hypothesis): the Gram tile plan, mirrored Gram block reads and KIP target augmentation, each
checked against a plain reference (a coverage count, the dense matrix, ``np.pad`` and slicing) on many small
cases. Derandomized with few examples, so the file runs in seconds and never flakes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelscale.gram.plan import TilePlan, sub_block_size, sub_blocks, tile_entries
from kernelscale.gram.store import GramStore, TileGrid
from kernelscale.kip.augment import TargetAugment, auto_shift
from krr_helpers import write_gram

FAST = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

grids = st.builds(lambda n, m, tile, symmetric: TileGrid(n, n if symmetric else m, tile, symmetric),
                  st.integers(1, 30), st.integers(1, 30), st.integers(1, 12), st.booleans())


def _coverage(grid: TileGrid, tiles: list[tuple[int, int]]) -> np.ndarray:
    """How many of ``tiles`` hold each entry of the (n, m) matrix."""
    count = np.zeros((grid.n, grid.m), np.int64)
    for i, j in tiles:
        r0, r1, c0, c1 = grid.bounds(i, j)
        count[r0:r1, c0:c1] += 1
    return count


@FAST
@given(grids)
def test_tile_grid_covers_the_matrix_or_its_upper_triangle_exactly_once(grid):
    tiles = list(grid)
    count = _coverage(grid, tiles)
    assert len(tiles) == len(set(tiles)) == len(grid)
    assert all(grid.stored(i, j) for i, j in tiles)
    if grid.symmetric:
        upper = np.triu(np.ones((grid.n, grid.n), bool))
        assert (count[upper] == 1).all()  # every entry on or above the diagonal in exactly one stored tile
        off = _coverage(grid, [(i, j) for i, j in tiles if i != j])
        assert (count + off.T == 1).all()  # stored tiles and the mirrors of off-diagonal ones: every entry once
        assert sum(tile_entries(grid, t) for t in tiles) == count.sum()
    else:
        assert (count == 1).all()
        assert sum(tile_entries(grid, t) for t in tiles) == grid.n * grid.m


@FAST
@given(grids, st.data(), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_tile_plan_hands_out_every_pending_tile_once_whatever_the_workers_ask(grid, data, workers, seed):
    all_tiles = list(grid)
    done = data.draw(st.sets(st.sampled_from(all_tiles)), label="done")
    plan = TilePlan(grid, done=done)
    assert plan.tiles() == set(all_tiles) - done and len(plan) == len(all_tiles) - len(done)
    rng = np.random.default_rng(seed)  # which worker asks next, and which tiles fail (once each)
    bands: list[int | None] = [None] * workers  # the row band each worker holds
    handed: list[tuple[int, int]] = []
    failed: set[tuple[int, int]] = set()
    while True:
        w = int(rng.integers(workers))
        tile = plan.next(bands[w])
        if tile is None:
            break
        if tile not in failed and rng.random() < 0.2:
            failed.add(tile)
            plan.push_back(tile)  # a failed tile is handed out again
            continue
        handed.append(tile)
        bands[w] = tile[0]
    assert sorted(handed) == sorted(set(all_tiles) - done) and len(plan) == 0


@FAST
@given(grids, st.integers(0, 50))
def test_tile_plan_max_tiles_and_selection_give_the_first_tiles_in_order(grid, max_tiles):
    first = list(grid)[:max_tiles]
    plan = TilePlan(grid, max_tiles=max_tiles)
    assert plan.tiles() == set(first) and plan.total == len(first)
    chosen = first[::2]
    assert TilePlan(grid, done=chosen, selection=chosen).tiles() == set(chosen)  # a selection ignores done


@FAST
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 17), st.booleans())
def test_sub_blocks_partition_a_tile_or_cover_its_upper_triangle_once(n_rows, n_cols, s, diagonal):
    if diagonal:
        n_cols = n_rows
    count = np.zeros((n_rows, n_cols), np.int64)
    for a, b in sub_blocks(n_rows, n_cols, s, diagonal):
        assert a % s == 0 and b % s == 0 and a < n_rows and b < n_cols
        count[a : a + s, b : b + s] += 1
    if diagonal:
        assert (count[np.triu(np.ones_like(count, bool))] == 1).all()
        assert (np.maximum(count, count.T) == 1).all()  # the rest is the mirror of a computed block
    else:
        assert (count == 1).all()


@FAST
@given(st.integers(1, 5000), st.integers(1, 64), st.integers(0, 10**8), st.integers(1, 4096))
def test_sub_block_size_fits_the_budget_and_is_a_multiple_of_8_above_8(tile, bytes_per_pair, budget, cap):
    s = sub_block_size(tile, bytes_per_pair, budget, cap)
    assert s * s * bytes_per_pair <= budget and s <= min(tile, cap)
    assert (s > 0) == (budget >= bytes_per_pair)
    assert s <= 8 or s % 8 == 0
    if 0 < s < min(tile, cap) and s < 8:
        assert (s + 1) ** 2 * bytes_per_pair > budget  # below 8 nothing is rounded off: the largest side that fits


@pytest.fixture(scope="module")
def gram_stores(tmp_path_factory) -> dict[tuple[int, int], tuple[GramStore, np.ndarray]]:
    """Complete symmetric Gram stores of random symmetric matrices, with their dense matrices, by (n, tile)."""
    root = tmp_path_factory.mktemp("grams")
    rng = np.random.default_rng(0)
    stores = {}
    for n, tile in ((1, 1), (7, 3), (10, 4), (10, 10), (11, 2)):
        a = rng.normal(size=(n, n))
        matrix = a + a.T
        stores[n, tile] = write_gram(str(root / f"g{n}_{tile}.zarr"), matrix, tile=tile, symmetric=True), matrix
    return stores


@settings(FAST, max_examples=40)
@given(st.sampled_from([(1, 1), (7, 3), (10, 4), (10, 10), (11, 2)]), st.data())
def test_gram_block_equals_the_slice_of_the_dense_matrix_across_the_diagonal(gram_stores, key, data):
    store, matrix = gram_stores[key]
    n = len(matrix)
    r0, r1 = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=2), label="rows"))
    c0, c1 = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=2), label="cols"))
    np.testing.assert_array_equal(store.block((r0, r1), (c0, c1)), matrix[r0:r1, c0:c1])
    np.testing.assert_array_equal(store.block(slice(r0, r1), slice(c0, c1)), matrix[r0:r1, c0:c1])


# -- KIP target augmentation ----------------------------------------------------------------------------------

augments = st.builds(lambda h, w, c, shift, flip: (TargetAugment(min(shift, (min(h, w) - 1) // 2), flip), (h, w, c)),
                     st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(0, 4), st.booleans())


def _images(shape: tuple[int, int, int], n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _reference(aug: TargetAugment, x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Row by row: reflect-pad by ``shift`` (``np.pad``), cut at (dy, dx), mirror along W when flagged."""
    s, (h, w) = aug.shift, x.shape[1:3]
    out = []
    for row, (dy, dx, flip) in zip(x, params):
        cut = np.pad(row, ((s, s), (s, s), (0, 0)), mode="reflect")[dy : dy + h, dx : dx + w]
        out.append(cut[:, ::-1] if flip else cut)
    return np.stack(out) if out else x


@FAST
@given(augments, st.integers(0, 12), st.integers(0, 2**31 - 1), st.integers(0, 10**6))
def test_augment_draw_is_a_function_of_seed_and_step_within_its_ranges(case, n, seed, step):
    aug, _ = case
    params = aug.draw(n, seed, step)
    assert params.shape == (n, 3) and params.dtype == np.int64
    assert ((params[:, :2] >= 0) & (params[:, :2] <= 2 * aug.shift)).all()
    assert set(params[:, 2].tolist()) <= ({0, 1} if aug.flip else {0})
    np.testing.assert_array_equal(aug.draw(n, seed, step), params)


@FAST
@given(augments, st.integers(0, 10), st.integers(0, 1000), st.data())
def test_augment_apply_equals_reflect_pad_and_slice_whatever_the_batch_split_or_row_order(case, n, step, data):
    aug, shape = case
    x = _images(shape, n, step)
    params = aug.draw(n, seed=3, step=step)
    whole = aug.apply(x, params)
    assert whole.shape == x.shape and whole.dtype == x.dtype
    np.testing.assert_array_equal(whole, _reference(aug, x, params))
    cut = data.draw(st.integers(0, n), label="split")
    parts = [aug.apply(x[:cut], params[:cut]), aug.apply(x[cut:], params[cut:])]
    np.testing.assert_array_equal(np.concatenate(parts), whole)  # each row depends on its own parameters only
    order = np.asarray(data.draw(st.permutations(range(n)), label="order"), np.int64)
    padded = aug.pad(x)
    np.testing.assert_array_equal(aug.crop(padded, order, params[order]), whole[order])
    grouped = TargetAugment.grouping(params)
    np.testing.assert_array_equal(aug.crop(padded, grouped, params[grouped]), whole[grouped])


@FAST
@given(augments, st.integers(0, 6))
def test_augment_pad_equals_numpy_reflect_pad(case, n):
    aug, shape = case
    x = _images(shape, n, 1)
    s = aug.shift
    np.testing.assert_array_equal(aug.pad(x), np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), mode="reflect"))


@FAST
@given(augments, st.integers(1, 6))
def test_augment_zero_shift_is_the_identity_and_a_flip_twice_is_the_identity(case, n):
    aug, shape = case
    x = _images(shape, n, 2)
    centre = np.tile([aug.shift, aug.shift, 0], (n, 1))
    np.testing.assert_array_equal(aug.apply(x, centre), x)
    flipped = np.tile([aug.shift, aug.shift, 1], (n, 1))
    once = aug.apply(x, flipped)
    np.testing.assert_array_equal(once, x[:, :, ::-1] if aug.active else x)
    np.testing.assert_array_equal(aug.apply(once, flipped), x)
    assert TargetAugment().apply(x, TargetAugment().draw(n, 0, 0)) is x  # none: the batch as it is


@FAST
@given(st.integers(1, 512), st.integers(1, 512), st.integers(1, 4))
def test_auto_shift_is_a_sixteenth_of_the_smaller_side_rounded_and_parse_accepts_it(h, w, c):
    side, shift = min(h, w), auto_shift((h, w, c))
    assert abs(shift - side / 16) <= 0.5
    documented = {side < 8: 0, 8 <= side <= 23: 1, 24 <= side <= 39: 2, side == 224: 14}
    assert documented.get(True, shift) == shift  # the values the module docstring names
    assert auto_shift((h * w * c,)) == 0  # flat rows are not images
    aug = TargetAugment.parse("auto", (h, w, c))
    assert aug == TargetAugment(shift=shift) and 2 * aug.shift < side
