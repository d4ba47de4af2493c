"""PGD on kernel-regression predictors: sanity checks of the attack."""

import numpy as np
import pytest

from kernelscale import kernels
from kernelscale.data import open_dataset
from kernelscale.errors import InputError
from kernelscale.robust import Attack, pgd, robust_accuracy


@pytest.fixture(scope="module")
def predictor(mnist_small):
    import jax.numpy as jnp

    train, test = open_dataset(mnist_small["train"]), open_dataset(mnist_small["val"])
    kfn = kernels.kernel_fn(kernels.parse_arch("fc:depth=2"))
    xs, ys = jnp.asarray(train.rows(0, train.n)), jnp.asarray(train.one_hot())
    kss = kfn(xs, xs, "ntk")
    alpha = jnp.linalg.solve(kss + 1e-3 * jnp.trace(kss) / len(xs) * jnp.eye(len(xs)), ys)

    def predict(x):
        return kfn(x, xs, "ntk") @ alpha

    affine = train.affine
    pixels = affine.invert(test.rows(0, 60))
    return predict, affine.apply, np.clip(pixels, 0, 1), test.labels[:60]


def test_parse():
    a = Attack.parse("linf:8/255", steps=10)
    assert a.norm == "linf" and abs(a.eps - 8 / 255) < 1e-12 and a.steps == 10
    assert Attack.parse("l2:0.5").eps == 0.5
    for bad in ("linf", "l1:0.1", "linf:x", "linf:-1"):
        with pytest.raises(InputError):
            Attack.parse(bad)


def test_eps_zero_changes_nothing(predictor):
    predict, to_inputs, pix, labels = predictor
    res = robust_accuracy(predict, to_inputs, pix, labels, Attack("linf", 0.0, steps=3))
    assert res["accuracy"] == res["robust_accuracy"] > 0.5


def test_robust_accuracy_falls_with_eps_and_pgd_beats_noise(predictor):
    predict, to_inputs, pix, labels = predictor
    accs = [robust_accuracy(predict, to_inputs, pix, labels, Attack("linf", e, steps=10)) for e in (0.02, 0.1, 0.3)]
    robust = [a["robust_accuracy"] for a in accs]
    assert robust[0] >= robust[1] >= robust[2]
    assert robust[2] < accs[2]["accuracy"] - 0.3
    assert all(a["robust_accuracy"] <= a["noise_accuracy"] for a in accs)
    assert accs[1]["robust_accuracy"] < accs[1]["noise_accuracy"]  # PGD is stronger than random noise


def test_perturbation_stays_in_ball_and_pixel_range(predictor):
    predict, to_inputs, pix, labels = predictor
    for attack in (Attack("linf", 0.05, steps=5), Attack("l2", 1.0, steps=5)):
        adv = pgd(predict, to_inputs, pix[:10], labels[:10], attack)
        assert adv.min() >= 0 and adv.max() <= 1
        d = (adv - pix[:10]).reshape(10, -1)
        size = np.abs(d).max(1) if attack.norm == "linf" else np.linalg.norm(d, axis=1)
        assert size.max() <= attack.eps * (1 + 1e-4)
