"""Tile geometry (gram.plan) and the typed Gram job (gram.job)."""

import dataclasses
import pickle

import pytest

from kernelscale.gram.job import GramJob, canonical_json
from kernelscale.gram.plan import TileGrid, bands
from kernelscale.kernels import parse_arch


def test_tiles_covering_a_range_equal_the_tiles_whose_bounds_intersect_it():
    grid = TileGrid(23, 17, 5, symmetric=False)
    for r0, r1, c0, c1 in [(0, 23, 0, 17), (4, 6, 9, 16), (5, 10, 0, 1), (22, 23, 16, 17)]:
        brute = [(i, j) for i in range(bands(23, 5)) for j in range(bands(17, 5))
                 if max(r0, grid.bounds(i, j)[0]) < min(r1, grid.bounds(i, j)[1])
                 and max(c0, grid.bounds(i, j)[2]) < min(c1, grid.bounds(i, j)[3])]
        assert list(grid.covering(r0, r1, c0, c1)) == brute


def test_is_tile_equals_membership_in_the_stored_tiles():
    for grid in (TileGrid(10, 10, 3, True), TileGrid(10, 7, 3, False)):
        stored = set(grid)
        candidates = [(i, j) for i in range(-1, 6) for j in range(-1, 6)]
        assert {t for t in candidates if grid.is_tile(*t)} == stored


def test_gram_job_is_immutable_and_survives_pickling_as_ray_sends_it():
    spec = parse_arch("fc:depth=2")
    job = GramJob(out="g.zarr", data="d.zarr", against=None, spec=canonical_json(spec.to_json()), dtype="float32",
                  tile=256, sub_block=128, cache_blocks=4, allow_code=False, input_shape=(28, 28, 1))
    assert job.spec == spec.canonical()
    assert pickle.loads(pickle.dumps(job)) == job
    assert job.spec_json == spec.to_json()
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.tile = 512
