"""Sharded KIP on Ray actors: a sharded step (and a tile-wise K_ss step) equals the single-process step.

Float tolerance: gradient sums agree to 1e-3 of their largest entry (only the summation order differs; float32
rounding is amplified by the solve with K_ss + lam I).
After Adam, a support entry whose gradient is ~0 moves by lr * g / (|g| + eps), so rounding in g can move
it by a fraction of a step; the states are compared to 5% of one Adam step (0.05 * lr per step taken).
"""

from __future__ import annotations

import numpy as np
import pytest

from kernelscale import kip as kipmod
from kernelscale.data import open_dataset
from kernelscale.distilled_store import open_distilled
from kernelscale.kernels import parse_arch
from kernelscale.kip_data import TargetSampler, init_random
from kernelscale.kip_run import distill
from kernelscale.kip_sharding import RayPool, pair_kernel, sharded_sums, tiled_sums


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
