"""Adversarial KIP: PGD target batches against the current support; determinism, sharding, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernelscale import kernels
from kernelscale.kip import step as kipmod
from kernelscale.kip.adversarial import AdversarialTargets
from kernelscale.data import open_dataset
from kernelscale.errors import InputError
from kernelscale.kip.run import distill
from kernelscale.kip.sharding import pair_kernel

SPEC = "fc:depth=2"


@pytest.fixture(scope="module")
def setup(mnist_small):
    data = open_dataset(mnist_small["train"])
    spec = kernels.parse_arch(SPEC)
    kip = kipmod.make_kip(pair_kernel(spec), lr=0.01, reg=1e-3, learn_labels=False)
    rows = np.concatenate([np.flatnonzero(data.labels == c)[:2] for c in range(data.num_classes)])
    state = kip.init(data.take(rows), data.one_hot(rows), seed=0)
    idx = np.arange(0, 300, 5)
    return data, spec, state, data.take(idx), data.one_hot(idx)


def _transform(setup, text, steps=4, mix=1.0):
    data, spec, *_ = setup
    return AdversarialTargets.build(text, steps, mix, spec, 1e-3, data.affine)


def test_eps_zero_is_identity_and_attack_raises_loss(setup):
    data, spec, state, x_t, y_t = setup
    x0, _ = jax.jit(_transform(setup, "linf:0"))(state, jnp.asarray(x_t), jnp.asarray(y_t))
    np.testing.assert_allclose(x0, x_t, atol=1e-4)  # pixels -> inputs round trip of the affine map
    adv = jax.jit(_transform(setup, "linf:0.2"))
    xa, ya = adv(state, jnp.asarray(x_t), jnp.asarray(y_t))
    np.testing.assert_array_equal(ya, y_t)
    pix_a, pix_0 = data.affine.invert(np.asarray(xa)), data.affine.invert(x_t)
    assert np.abs(pix_a - pix_0).max() <= 0.2 + 1e-4 and pix_a.min() >= -1e-4 and pix_a.max() <= 1 + 1e-4
    loss = lambda x: kipmod.sum_loss(pair_kernel(spec), state.x, state.y, jnp.asarray(x), jnp.asarray(y_t), 1e-3)
    (l_clean, c_clean), (l_adv, c_adv) = loss(x_t), loss(xa)
    assert l_adv > 1.5 * l_clean and c_adv < c_clean


def test_rows_do_not_depend_on_batch_split_and_mix(setup):
    _, _, state, x_t, y_t = setup
    adv = jax.jit(_transform(setup, "l2:1.0"))
    whole, _ = adv(state, jnp.asarray(x_t), jnp.asarray(y_t))
    first, _ = adv(state, jnp.asarray(x_t[:25]), jnp.asarray(y_t[:25]))
    np.testing.assert_allclose(whole[:25], first, atol=1e-4)
    again, _ = adv(state, jnp.asarray(x_t), jnp.asarray(y_t))
    np.testing.assert_array_equal(whole, again)  # deterministic for a given state key
    other_key = state._replace(key=jax.random.PRNGKey(7))
    moved, _ = adv(other_key, jnp.asarray(x_t), jnp.asarray(y_t))
    assert not np.allclose(moved, whole)  # the random start comes from the step's key
    half, _ = jax.jit(_transform(setup, "l2:1.0", mix=0.5))(state, jnp.asarray(x_t), jnp.asarray(y_t))
    replaced = np.any(np.abs(np.asarray(half) - x_t) > 1e-3, axis=(1, 2, 3))
    assert 0.2 < replaced.mean() < 0.8
    with pytest.raises(InputError):
        _transform(setup, "linf:0.1", mix=0.0)


def test_sharded_step_equals_whole_step(setup):
    """Two target shards (summed, as the Ray pool does) give the same update as the whole batch."""
    _, spec, state, x_t, y_t = setup
    kip = kipmod.make_kip(pair_kernel(spec), lr=0.01, reg=1e-3, learn_labels=False,
                          target_transform=_transform(setup, "linf:0.1"))
    whole, _ = kip.update(state, (x_t, y_t))
    parts = [kip.shard_loss_and_grads(state, (x_t[s], y_t[s])) for s in (slice(0, 30), slice(30, None))]
    sums = {k: parts[0][k] + parts[1][k] for k in ("loss", "correct", "gx", "gy")}
    sharded, _ = kip.apply(state, sums, len(x_t))
    np.testing.assert_allclose(sharded.x, whole.x, atol=1e-5)


def test_distill_adversarial_resume_is_bitwise(mnist_small, tmp_path, monkeypatch):
    """An adversarial run killed after its step-2 checkpoint and resumed ends bitwise equal to the whole run."""
    from kernelscale.kip import run as kip_run
    from kernelscale.kip.store import open_distilled

    kw = dict(arch=SPEC, ipc=2, target_batch=40, reg=1e-3, steps=4, checkpoint_every=2, progress=False,
              adversarial="linf:0.1", pgd_steps=3, adv_mix=0.75)
    full, part = str(tmp_path / "full.zarr"), str(tmp_path / "part.zarr")
    s = distill(mnist_small["train"], out=full, **kw)
    assert s["adversarial"].startswith("PGD linf:0.1") and open_distilled(full).attrs["config"]["adversarial"]["mix"] == 0.75
    real_commit = kip_run._commit

    def commit_then_die(store, state, history, step):
        real_commit(store, state, history, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(kip_run, "_commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill(mnist_small["train"], out=part, **kw)
    monkeypatch.setattr(kip_run, "_commit", real_commit)
    assert open_distilled(part).attrs["checkpoint"] == 2
    # resuming with other adversarial settings (or none) is refused before any compute
    for other in ("linf:0.2", None):
        with pytest.raises(InputError, match="adversarial"):
            distill(mnist_small["train"], out=part, resume=True, **{**kw, "adversarial": other})
    s2 = distill(mnist_small["train"], out=part, resume=True, **kw)
    assert s2["start_step"] == 2
    a, b = open_distilled(full), open_distilled(part)
    np.testing.assert_array_equal(a.support()[0], b.support()[0])
    np.testing.assert_array_equal(a.history()["loss"], b.history()["loss"])
    plain = str(tmp_path / "plain.zarr")
    distill(mnist_small["train"], out=plain, **{**kw, "adversarial": None})
    assert not np.allclose(open_distilled(plain).support()[0], a.support()[0])  # adversarial targets changed the run


def test_cli_distill_adversarial_flags_checked_before_compute(mnist_small, tmp_path, capsys):
    from kernelscale.cli import main

    base = ["distill", mnist_small["train"], "--arch", SPEC, "--ipc", "1", "--steps", "1", "--target-batch", "20",
            "--no-progress", "--json"]
    assert main(base + ["--out", str(tmp_path / "a.zarr"), "--adversarial", "linf:0.1", "--adv-mix", "1.5"]) == 2
    assert main(base + ["--out", str(tmp_path / "b.zarr"), "--adversarial", "l3:0.1"]) == 2
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "c.zarr"), "--adversarial", "l2:0.5", "--pgd-steps", "2"]) == 0
    import json

    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["adversarial"].startswith("PGD l2:0.5 x2 steps") and s["steps_done"] == 1


def test_distill_adversarial_two_ray_workers_match_one(mnist_small, ray_local, tmp_path):
    """The transform travels to Ray shard workers; per-row randomness makes the sharded run equal the local one."""
    from kernelscale.kip.store import open_distilled

    kw = dict(arch=SPEC, ipc=1, target_batch=40, reg=1e-3, steps=2, progress=False, adversarial="l2:1.0",
              pgd_steps=2)
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    distill(mnist_small["train"], out=one, workers=1, **kw)
    distill(mnist_small["train"], out=two, workers=2, **kw)
    xa, xb = open_distilled(one).support()[0], open_distilled(two).support()[0]
    np.testing.assert_allclose(xb, xa, atol=2 * 2 * 0.01)  # Adam moves an entry by <= ~lr per step
    assert np.abs(xb - xa).mean() < 1e-4  # almost every entry agrees far more closely
