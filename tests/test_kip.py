"""KIP: the pure step, tile-wise gradients, sampling, label solve, the distilled store and the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernelscale.kip import step as kipmod
from kernelscale.cli import main
from kernelscale.data import open_dataset
from kernelscale.kip.store import open_distilled
from kernelscale.kernels import parse_arch
from kernelscale.kip.targets import TargetSampler, init_random
from kernelscale.kip.run import distill, evaluate
from kernelscale.kip.sharding import LocalPool, ShardWorker, pair_kernel, sharded_sums, tiled_sums


def _problem(rng: np.random.Generator, n_s: int = 12, n_t: int = 40, d: int = 6, c: int = 3):
    x_s = rng.normal(size=(n_s, d)).astype(np.float32)
    x_t = rng.normal(size=(n_t, d)).astype(np.float32)
    y_s = (np.eye(c)[rng.integers(0, c, n_s)] - 1 / c).astype(np.float32)
    y_t = (np.eye(c)[rng.integers(0, c, n_t)] - 1 / c).astype(np.float32)
    return x_s, y_s, x_t, y_t


def _kernel():
    return pair_kernel(parse_arch("fc:depth=2", "ntk"))


def test_loss_matches_formula(rng):
    """The loss is 1/(2B) sum ||y_t - K_ts (K_ss + reg tr(K_ss)/n I)^-1 y_s||^2 (checked in float64 numpy)."""
    x_s, y_s, x_t, y_t = _problem(rng)
    kern, reg = _kernel(), 1e-3
    kip = kipmod.make_kip(kern, lr=0.01, reg=reg, learn_labels=True)
    _, metrics = kip.update(kip.init(x_s, y_s), (x_t, y_t))
    k_ss = np.asarray(kern(x_s, x_s), np.float64)
    k_ts = np.asarray(kern(x_t, x_s), np.float64)
    a = k_ss + reg * np.trace(k_ss) / len(x_s) * np.eye(len(x_s))
    expected = 0.5 * np.sum((y_t - k_ts @ np.linalg.solve(a, y_s)) ** 2) / len(x_t)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)


def test_steps_reduce_loss_and_labels_fixed_unless_learned(rng):
    x_s, y_s, x_t, y_t = _problem(rng)
    for learn in (False, True):
        kip = kipmod.make_kip(_kernel(), lr=0.05, reg=1e-4, learn_labels=learn)
        state = kip.init(x_s, y_s)
        losses = []
        for _ in range(30):
            state, m = kip.update(state, (x_t, y_t))
            losses.append(float(m["loss"]))
        assert losses[-1] < 0.7 * losses[0]
        assert int(state.step) == 30
        assert np.array_equal(np.asarray(state.y), y_s) != learn
        assert not np.array_equal(np.asarray(state.x), x_s)


def test_schedule_and_label_lr(rng):
    """Cosine decay reaches 0 at total_steps; labels move with their own step size (Adam: about lr per step)."""
    sched = kipmod.learning_rate(0.1, "cosine", 10)
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(10)) == pytest.approx(0.0, abs=1e-9)
    assert float(sched(5)) == pytest.approx(0.05, rel=1e-5)
    assert float(kipmod.learning_rate(0.1, "linear", 10)(5)) == pytest.approx(0.05, rel=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        kipmod.learning_rate(0.1, "step", 10)
    x_s, y_s, x_t, y_t = _problem(rng)
    moved = {}
    for label_lr in (1e-3, 1e-1):
        kip = kipmod.make_kip(_kernel(), lr=1e-3, label_lr=label_lr, reg=1e-4, learn_labels=True)
        state, _ = kip.update(kip.init(x_s, y_s), (x_t, y_t))
        moved[label_lr] = (float(np.abs(np.asarray(state.y) - y_s).max()), float(np.abs(np.asarray(state.x) - x_s).max()))
    assert moved[1e-1][0] == pytest.approx(1e-1, rel=1e-2) and moved[1e-3][0] == pytest.approx(1e-3, rel=1e-2)
    assert moved[1e-1][1] == pytest.approx(moved[1e-3][1])  # x's step does not depend on the label lr


def test_state_is_a_pytree(rng):
    x_s, y_s, _, _ = _problem(rng)
    kip = kipmod.make_kip(_kernel(), lr=0.01, reg=1e-6, learn_labels=True)
    state = kip.init(x_s, y_s, seed=3)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, kipmod.KipState) and np.array_equal(back.x, state.x)


def test_shard_sums_equal_whole_batch_step(rng):
    """Summing per-slice loss/gradients and applying gives the single-batch step (float tolerance)."""
    x_s, y_s, x_t, y_t = _problem(rng)
    kip = kipmod.make_kip(_kernel(), lr=0.01, reg=1e-4, learn_labels=True)
    state = kip.init(x_s, y_s)
    whole, m_whole = kip.update(state, (x_t, y_t))
    parts = [kip.shard_loss_and_grads(state, (x_t[s], y_t[s])) for s in (slice(0, 13), slice(13, 40))]
    sums = jax.tree_util.tree_map(lambda a, b: a + b, *parts)
    split, m_split = kip.apply(state, sums, len(x_t))
    np.testing.assert_allclose(split.x, whole.x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split.y, whole.y, rtol=1e-5, atol=1e-6)
    assert float(m_split["loss"]) == pytest.approx(float(m_whole["loss"]), rel=1e-5)


def test_tiled_kss_gradient_equals_autodiff(rng):
    """The tile-wise K_ss gradient assembly equals jax.grad of the whole loss (uneven tiles, 2 target shards).

    Every piece is jitted as ShardWorker jits it (tile bounds static), the whole-loss gradient as KIP's step is."""
    x_s, y_s, x_t, y_t = _problem(rng, n_s=11)
    kern, reg = _kernel(), 1e-3
    (loss, _), (gx, gy) = jax.jit(jax.value_and_grad(lambda a, b: kipmod.sum_loss(kern, a, b, x_t, y_t, reg), (0, 1),
                                                     has_aux=True))(x_s, y_s)
    tiles = kipmod.tile_pairs(11, 6)  # diagonal tiles of 6 and 5 rows, one 6 x 5 off-diagonal tile
    assert len(tiles) == 3
    kss_tile = jax.jit(lambda xs, b: kipmod.kss_tile(kern, xs, b), static_argnums=1)
    kss_tile_vjp = jax.jit(lambda xs, b, g: kipmod.kss_tile_vjp(kern, xs, b, g), static_argnums=1)
    target_terms = jax.jit(lambda xs, al, xt, yt: kipmod.target_terms(kern, xs, al, xt, yt))
    k_ss = np.zeros((11, 11), np.float32)
    for b in tiles:
        r0, r1, c0, c1 = b
        k_ss[r0:r1, c0:c1] = kss_tile(x_s, b)
        k_ss[c0:c1, r0:r1] = k_ss[r0:r1, c0:c1].T
    alpha = kipmod.krr_weights(jnp.asarray(k_ss), y_s, reg)
    terms = [target_terms(x_s, alpha, x_t[s], y_t[s]) for s in (slice(0, 25), slice(25, 40))]
    u = terms[0]["u"] + terms[1]["u"]
    g_kss, gy_tiled = kipmod.kss_cotangent(jnp.asarray(k_ss), alpha, u, reg)
    gx_tiled = terms[0]["gx"] + terms[1]["gx"] + sum(kss_tile_vjp(x_s, b, g_kss) for b in tiles)
    assert float(terms[0]["loss"] + terms[1]["loss"]) == pytest.approx(float(loss), rel=1e-4)
    np.testing.assert_allclose(gx_tiled, gx, rtol=2e-3, atol=1e-5 * float(jnp.abs(gx).max()))
    np.testing.assert_allclose(gy_tiled, gy, rtol=2e-3, atol=1e-5 * float(jnp.abs(gy).max()))


def test_solve_labels_beats_one_hot(rng):
    x_s, y_s, x_t, y_t = _problem(rng, n_t=200)
    kern, reg = _kernel(), 1e-4
    k_ts, k_ss = np.asarray(kern(x_t, x_s)), np.asarray(kern(x_s, x_s))
    solved = kipmod.solve_labels(k_ts, y_t, k_ss, reg)

    def err(y):
        w = np.linalg.solve(k_ss + reg * np.trace(k_ss) / len(k_ss) * np.eye(len(k_ss)), y)
        return np.sum((y_t - k_ts @ w) ** 2)

    assert err(solved) < err(y_s)


def test_sampler_is_deterministic_and_balanced(mnist_small):
    data = open_dataset(mnist_small["train"])
    a = TargetSampler(data, 50, seed=1)
    b = TargetSampler(data, 50, seed=1, memory_limit=0)  # read by rows instead of from memory
    assert b.x_in_memory is None and a.x_in_memory is not None
    idx = a.indices(7)
    assert np.array_equal(idx, b.indices(7)) and not np.array_equal(idx, a.indices(8))
    assert np.bincount(data.labels[idx], minlength=10).tolist() == [5] * 10
    xa, ya = a.batch(7)
    xb, yb = b.batch(7)
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    parts = [a.batch(7, p, 3)[0] for p in range(3)]
    assert np.array_equal(np.concatenate(parts), xa)
    it = list(a.iterate(5, 8))
    assert len(it) == 3 and np.array_equal(it[2][0], xa)
    rows = init_random(data, 3, seed=0)
    assert np.bincount(data.labels[rows], minlength=10).tolist() == [3] * 10


def test_local_pool_tiled_step_equals_in_process_step(mnist_small):
    """A step through the worker pool, with K_ss tile-wise, equals the fused single-process step."""
    data = open_dataset(mnist_small["train"])
    spec = parse_arch("fc:depth=2", "ntk")
    kw = dict(lr=0.01, reg=1e-4, learn_labels=True, batch=60, seed=2)
    worker = ShardWorker(mnist_small["train"], spec.canonical(), **kw)
    pool = LocalPool([worker])
    rows = init_random(data, 2, seed=0)
    kip = kipmod.make_kip(pair_kernel(spec), lr=0.01, reg=1e-4, learn_labels=True)
    state = kip.init(data.take(rows), data.one_hot(rows))
    ref, m_ref = kip.update(state, worker.sampler.batch(4))
    sums, count, _ = sharded_sums(pool, state, 4)
    plain, _ = kip.apply(state, sums, count)
    tiled_s, count_t, _ = tiled_sums(pool, state, 4, tile=7, reg=1e-4)
    tiled, m_t = kip.apply(state, tiled_s, count_t)
    for got in (plain, tiled):
        np.testing.assert_allclose(got.x, ref.x, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.y, ref.y, rtol=1e-4, atol=1e-5)
    assert float(m_t["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-4)


def _run(args: list[str], capsys) -> tuple[int, dict]:
    code = main(args + ["--json", "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


def test_cli_distill_evaluate_and_resume_is_exact(mnist_small, tmp_path, capsys, monkeypatch):
    """A run killed after its step-3 checkpoint and rerun with --resume (default cosine schedule, separate label
    lr, translated and flipped targets) ends bitwise equal to the uninterrupted run."""
    from kernelscale.kip import run as kip_run

    common = [mnist_small["train"], "--arch", "fc:depth=2", "--ipc", "2", "--target-batch", "40", "--lr", "0.02",
              "--label-lr", "0.05", "--learn-labels", "--checkpoint-every", "3", "--seed", "5", "--steps", "6",
              "--target-augment", "shift=1,flip"]
    full, part = str(tmp_path / "full.zarr"), str(tmp_path / "part.zarr")
    code, s = _run(["distill", *common, "--out", full, "--val", mnist_small["val"], "--eval-every", "3"], capsys)
    assert code == 0 and s["steps_done"] == 6 and s["history"]["val_step"] == [0, 3, 6] and s["schedule"] == "cosine"
    assert s["target_augment"] == "shift=1,flip"
    assert (tmp_path / "full_images.png").stat().st_size > 0 and (tmp_path / "full_curves.png").stat().st_size > 0
    real_commit = kip_run._commit

    def commit_then_die(store, state, history, step):
        real_commit(store, state, history, step)
        if step == 3:
            raise KeyboardInterrupt("simulated kill after the step-3 checkpoint")

    monkeypatch.setattr(kip_run, "_commit", commit_then_die)
    assert main(["distill", *common, "--out", part, "--no-progress"]) == 130
    monkeypatch.setattr(kip_run, "_commit", real_commit)
    assert open_distilled(part).attrs["checkpoint"] == 3
    other_aug = [*common[:-1], "none", "--resume", "--out", part, "--no-progress"]
    assert main(["distill", *other_aug]) == 2 and "target_augment" in capsys.readouterr().err
    code, s2 = _run(["distill", *common, "--resume", "--out", part], capsys)
    assert code == 0 and s2["start_step"] == 3
    a, b = open_distilled(full), open_distilled(part)
    xa, ya = a.support()
    xb, yb = b.support()
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)  # bitwise: same batches, same deterministic step
    assert np.array_equal(a.history()["loss"], b.history()["loss"]) and len(a.history()["loss"]) == 6
    assert a.attrs["steps_done"] == 6 and a.attrs["checkpoint"] == 6
    assert xa.shape == (20, 8, 8, 1) and ya.shape == (20, 10) and ya.dtype == np.float32
    assert list(a.group["checkpoints"].group_keys()) == ["6"]  # older checkpoints removed after commit
    code, e = _run(["evaluate", full, "--test", mnist_small["val"]], capsys)
    assert code == 0 and 0.0 <= e["accuracy"] <= 1.0 and e["mse"] > 0 and e["n"] == 100
    assert e["accuracy"] == pytest.approx(s["val_accuracy"], abs=1e-6)


def test_interrupted_checkpoint_leaves_previous_intact(mnist_small, tmp_path, monkeypatch):
    out = str(tmp_path / "d.zarr")
    kw = dict(arch="fc:depth=2", ipc=1, target_batch=20, checkpoint_every=2, progress=False)
    distill(mnist_small["train"], out=out, steps=2, **kw)
    from kernelscale.kip import store as distilled_store

    real = distilled_store.DistilledStore._write_history

    def crash(group, history):  # dies after the leaves of checkpoint 4 are written, before the commit
        if group.path.endswith("checkpoints/4"):
            raise KeyboardInterrupt("simulated kill")
        real(group, history)

    monkeypatch.setattr(distilled_store.DistilledStore, "_write_history", staticmethod(crash))
    with pytest.raises(KeyboardInterrupt):
        distill(mnist_small["train"], out=out, steps=4, resume=True, **kw)
    store = open_distilled(out)
    assert store.attrs["checkpoint"] == 2 and store.attrs["steps_done"] == 2
    monkeypatch.setattr(distilled_store.DistilledStore, "_write_history", staticmethod(real))
    s = distill(mnist_small["train"], out=out, steps=4, resume=True, **kw)
    assert s["start_step"] == 2 and open_distilled(out).attrs["checkpoint"] == 4


def test_non_finite_loss_stops_with_exit_3_and_keeps_checkpoint(mnist_small, tmp_path, capsys):
    from kernelscale.errors import NotConvergedError

    out = str(tmp_path / "nan.zarr")
    common = [mnist_small["train"], "--arch", "fc:depth=2", "--ipc", "1", "--target-batch", "20",
              "--checkpoint-every", "2", "--out", out]
    assert _run(["distill", *common, "--steps", "2"], capsys)[0] == 0
    code, s = _run(["distill", *common, "--steps", "5", "--resume", "--lr", "1e30"], capsys)
    assert code == 2 and "lr" in s["error"]  # other settings than the stored run: refused before compute

    def poison(state, x_t, y_t):  # NaN targets from step 5 on (e.g. a diverging attack in adversarial KIP)
        return x_t * jnp.where(state.step >= 5, jnp.nan, 1.0), y_t

    with pytest.raises(NotConvergedError, match="non-finite") as info:
        distill(mnist_small["train"], out=out, arch="fc:depth=2", ipc=1, target_batch=20, checkpoint_every=2,
                steps=8, resume=True, progress=False, target_transform=poison)
    assert info.value.exit_code == 3 and info.value.summary["failed_step"] == 5
    store = open_distilled(out)
    assert store.attrs["checkpoint"] == 4 and store.attrs["steps_done"] == 4
    assert all(np.isfinite(v).all() for v in store.support())
    assert len(store.history()["loss"]) == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ipc", "500"], "--ipc 500"),
        (["--arch", "resnet"], "unknown architecture"),
        (["--init", "gram"], "--gram"),
        (["--target-batch", "0"], "--target-batch"),
        (["--lr", "-1"], "--lr"),
        (["--label-lr", "0"], "--label-lr"),
        (["--kss-tile", "0"], "--kss-tile"),
        (["--target-augment", "shift=4"], "at most shift=3"),
        (["--target-augment", "zoom"], "--target-augment"),
    ],
)
def test_bad_input_refused_before_compute(mnist_small, tmp_path, capsys, extra, message):
    out = str(tmp_path / "bad.zarr")
    code = main(["distill", mnist_small["train"], "--out", out, "--no-progress", *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad.zarr").exists()


def test_val_with_other_preprocessing_refused(mnist_small, tmp_path, capsys):
    from kernelscale.data import ingest

    other = str(tmp_path / "other.zarr")
    ingest("mnist5k", other, limit=50, resize="8x8", preprocess="none", progress=False)
    code = main(["distill", mnist_small["train"], "--val", other, "--out", str(tmp_path / "x.zarr"), "--no-progress"])
    assert code == 2 and "preprocessed differently" in capsys.readouterr().err
    shape = str(tmp_path / "shape.zarr")
    ingest("mnist5k", shape, limit=50, resize="6x6", preprocess="standardize", progress=False)
    out = str(tmp_path / "ok.zarr")
    distill(mnist_small["train"], out=out, arch="fc:depth=2", ipc=1, steps=1, target_batch=10, progress=False)
    with pytest.raises(Exception, match="shape"):
        evaluate(out, shape)


def test_cli_kss_tile_matches_fused_step(mnist_small, tmp_path, capsys):
    """`--kss-tile T` (K_ss tile-wise through the worker pool) gives the same support as the fused step."""
    common = [mnist_small["train"], "--arch", "fc:depth=2", "--ipc", "1", "--target-batch", "30", "--steps", "2",
              "--learn-labels"]
    fused, tiled = str(tmp_path / "fused.zarr"), str(tmp_path / "tiled.zarr")
    assert _run(["distill", *common, "--out", fused], capsys)[0] == 0
    code, s = _run(["distill", *common, "--kss-tile", "4", "--out", tiled], capsys)
    assert code == 0 and s["kss_tile"] == 4
    (xa, ya), (xb, yb) = open_distilled(fused).support(), open_distilled(tiled).support()
    step = 2 * 0.01  # two Adam steps of lr 0.01: rounding may move a near-zero-gradient entry by part of one
    np.testing.assert_allclose(xb, xa, atol=0.05 * step)
    np.testing.assert_allclose(yb, ya, atol=0.05 * step)
