"""Sharded KIP on Ray actors: a sharded step (and a tile-wise K_ss step) equals the single-process step.

Float tolerance: gradient sums agree to 1e-3 of their largest entry (only the summation order differs; float32
rounding is amplified by the solve with K_ss + lam I).
After Adam, a support entry whose gradient is ~0 moves by lr * g / (|g| + eps), so rounding in g can move
it by a fraction of a step; the states are compared to 5% of one Adam step (0.05 * lr per step taken).
"""

from __future__ import annotations

import numpy as np
import pytest

from kernelscale.kip import step as kipmod
from kernelscale.data import open_dataset
from kernelscale.kip.store import open_distilled
from kernelscale.kernels import parse_arch
from kernelscale.kip.targets import TargetSampler, init_random
from kernelscale.kip.run import distill
from kernelscale.kip.sharding import RayPool, ShardWorker, pair_kernel, sharded_sums, tiled_sums


def test_ray_sharded_and_tiled_steps_equal_single_process(mnist_small, ray_local):
    data = open_dataset(mnist_small["train"])
    spec = parse_arch("fc:depth=2", "ntk")
    kw = dict(lr=0.01, reg=1e-2, learn_labels=True, batch=70, seed=3, parts=2)
    pool = RayPool(lambda w: ((mnist_small["train"], spec.canonical()), dict(kw, part=w)), workers=2)
    try:
        kip = kipmod.make_kip(pair_kernel(spec), lr=0.01, reg=1e-2, learn_labels=True)
        rows = init_random(data, 2, seed=0)
        state = kip.init(data.take(rows), data.one_hot(rows))
        sampler = TargetSampler(data, 70, seed=3)
        ref = state
        sharded = state
        for step in range(3):
            ref, m_ref = kip.update(ref, sampler.batch(step))
            sums, count, timing = sharded_sums(pool, sharded, step)
            assert count == 70 and timing["workers"] > 0
            whole = kip.shard_loss_and_grads(sharded, sampler.batch(step))
            for k in ("gx", "gy"):
                np.testing.assert_allclose(sums[k], whole[k], rtol=1e-3, atol=1e-3 * float(np.abs(whole[k]).max()))
            sharded, m_sh = kip.apply(sharded, sums, count)
            assert float(m_sh["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-4)
        np.testing.assert_allclose(sharded.x, ref.x, rtol=1e-4, atol=3 * 0.05 * 0.01)
        np.testing.assert_allclose(sharded.y, ref.y, rtol=1e-4, atol=3 * 0.05 * 0.01)
        tiled_s, count, _ = tiled_sums(pool, state, 0, tile=6, reg=1e-2)
        tiled, _ = kip.apply(state, tiled_s, count)
        first, _ = kip.update(state, sampler.batch(0))
        np.testing.assert_allclose(tiled.x, first.x, rtol=1e-4, atol=0.05 * 0.01)
        np.testing.assert_allclose(tiled.y, first.y, rtol=1e-4, atol=0.05 * 0.01)
    finally:
        pool.close()


def test_distill_with_two_workers_matches_one(mnist_small, ray_local, tmp_path):
    kw = dict(arch="fc:depth=2", ipc=2, steps=4, target_batch=40, lr=0.02, learn_labels=True, seed=1,
              checkpoint_every=2, progress=False)
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    distill(mnist_small["train"], out=one, workers=1, **kw)
    s = distill(mnist_small["train"], out=two, workers=2, **kw)
    assert s["comm_seconds_per_step"] is not None
    (xa, ya), (xb, yb) = open_distilled(one).support(), open_distilled(two).support()
    np.testing.assert_allclose(xb, xa, rtol=1e-4, atol=4 * 0.05 * 0.02)
    np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=4 * 0.05 * 0.02)
    assert np.abs(xb - xa).mean() < 1e-5  # almost every entry agrees far more closely


def test_gram_init_floor_and_ceiling_from_a_computed_gram(mnist_small, ray_local, tmp_path):
    """`--init gram` over a Gram from the engine: class-balanced pivots that span each class better than random
    rows; the label-solve floor and full-KRR ceiling match a dense numpy computation."""
    from kernelscale.gram.engine import compute_gram
    from kernelscale.gram.store import open_gram
    from kernelscale.kip.targets import init_gram

    spec = parse_arch("fc:depth=2", "ntk")
    gpath = str(tmp_path / "g.zarr")
    compute_gram(mnist_small["train"], spec, gpath, tile=128, workers=2, progress=False)  # 3 x 3 tiles
    data, val = open_dataset(mnist_small["train"]), open_dataset(mnist_small["val"])
    gram = open_gram(gpath)
    k = gram.to_numpy().astype(np.float64)
    rows = init_gram(data, gram, 3, seed=0)
    assert len(np.unique(rows)) == 30 and np.array_equal(np.bincount(data.labels[rows], minlength=10), [3] * 10)

    def residual(support):  # trace of the Nystrom residual of each class restricted to its rows, summed
        total = 0.0
        for c in range(10):
            cls = np.flatnonzero(data.labels == c)
            s = np.intersect1d(support, cls)
            kcs = k[np.ix_(cls, s)]
            total += np.trace(k[np.ix_(cls, cls)]) - np.trace(kcs @ np.linalg.pinv(k[np.ix_(s, s)]) @ kcs.T)
        return total

    # RPCholesky is randomised too: compare the means over the same 5 seeds (deterministic given the seeds)
    gram_mean = np.mean([residual(init_gram(data, gram, 3, seed)) for seed in range(5)])
    random_mean = np.mean([residual(init_random(data, 3, seed)) for seed in range(5)])
    assert gram_mean < 0.97 * random_mean

    s = distill(mnist_small["train"], out=str(tmp_path / "d.zarr"), arch="fc:depth=2", ipc=3, steps=2,
                target_batch=40, learn_labels=True, init="gram", gram=gpath, val=mnist_small["val"], progress=False)
    assert s["init"] == "gram"
    assert np.array_equal(open_distilled(str(tmp_path / "d.zarr")).group["support_rows"][...], rows)
    reg, y = 1e-6, data.one_hot().astype(np.float64)
    labels = kipmod.solve_labels(k[:, rows], y, k[np.ix_(rows, rows)], reg)
    kern = pair_kernel(spec)
    k_vs = np.asarray(kern(val.rows(0, val.n), data.take(rows)), np.float64)
    a = k[np.ix_(rows, rows)] + reg * np.trace(k[np.ix_(rows, rows)]) / len(rows) * np.eye(len(rows))
    floor_val = np.mean(np.argmax(k_vs @ np.linalg.solve(a, labels), 1) == val.labels)
    assert s["label_solve_floor"]["val_accuracy"] == pytest.approx(floor_val, abs=0.011)  # float32 vs float64 kernel
    k_va = np.asarray(kern(val.rows(0, val.n), data.rows(0, data.n)), np.float64)
    full = k + reg * np.trace(k) / len(k) * np.eye(len(k))
    ceiling = np.mean(np.argmax(k_va @ np.linalg.solve(full, y), 1) == val.labels)
    assert s["full_krr_ceiling"]["val_accuracy"] == pytest.approx(ceiling, abs=0.011)
    assert s["full_krr_ceiling"]["val_accuracy"] > s["label_solve_floor"]["val_accuracy"]


def test_kss_tiles_compile_once_per_tile_shape_and_equal_kip_step_tiles(mnist_small):
    """A worker's K_ss tiles and their vjp equal kip.step's per-tile functions (the reference), and compile once per
    tile shape: 6 tiles of a 20-image support in tiles of 7 have 2 diagonal and 2 off-diagonal shapes."""
    data = open_dataset(mnist_small["train"])
    spec = parse_arch("fc:depth=2", "ntk")
    worker = ShardWorker(mnist_small["train"], spec.canonical(), lr=0.01, reg=1e-3, learn_labels=True, batch=20, seed=0)
    x_s = data.take(init_random(data, 2, seed=0))
    tiles = kipmod.tile_pairs(len(x_s), 7)
    cot = np.random.default_rng(0).standard_normal((len(x_s), len(x_s))).astype(np.float32)
    got = worker.kss_tiles(x_s, tiles)
    grad = worker.kss_vjp(x_s, tiles, cot)
    kernel = pair_kernel(spec)
    for bounds, tile in zip(tiles, got):
        np.testing.assert_allclose(tile, kipmod.kss_tile(kernel, x_s, bounds), rtol=1e-6, atol=1e-7)
    ref = sum(np.asarray(kipmod.kss_tile_vjp(kernel, x_s, b, cot)) for b in tiles)
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-6 * float(np.abs(ref).max()))
    assert len(tiles) == 6
    assert worker._block_sym._cache_size() == 2 and worker._block._cache_size() == 2
    assert worker._block_sym_vjp._cache_size() == 2 and worker._block_vjp._cache_size() == 2
