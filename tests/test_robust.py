"""PGD on kernel-regression predictors: sanity checks of the attack."""

import numpy as np
import pytest

from kernelscale import kernels
from kernelscale.data import open_dataset
from kernelscale.errors import InputError
from kernelscale.attack.kernel_pgd import Attack, pgd, robust_accuracy


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


# -- chunked predictor, slices, distributed attack, CLI ----------------------------------------------------------


def _support_recipe(mnist_small, n=40):
    import jax.numpy as jnp

    from kernelscale.kip.step import krr_weights
    from kernelscale.kip.sharding import pair_kernel
    from kernelscale.robust.run import PredictorRecipe

    train = open_dataset(mnist_small["train"])
    spec = kernels.parse_arch("fc:depth=2")
    x = train.rows(0, n)
    kern = pair_kernel(spec)
    w = np.asarray(krr_weights(kern(jnp.asarray(x), jnp.asarray(x)), jnp.asarray(train.one_hot(np.arange(n))), 1e-3))
    return PredictorRecipe(spec.canonical(), w, x_train=x, chunk=16)


def test_chunked_predictor_equals_direct_and_pgd_agrees(mnist_small):
    import jax
    import jax.numpy as jnp

    from kernelscale.attack.kernel_pgd import KernelPredictor, margin

    recipe = _support_recipe(mnist_small)  # 40 rows in chunks of 16: the last chunk is padded
    chunked = recipe.build()
    kern = kernels.pairwise(kernels.parse_arch("fc:depth=2"))
    whole = KernelPredictor(lambda a, b: kernels.kernel_fn(kernels.parse_arch("fc:depth=2"))(a, b, "ntk"),
                            recipe.x_train, recipe.weights, chunk=1000)
    test = open_dataset(mnist_small["val"])
    x, y = jnp.asarray(test.rows(0, 12)), jnp.asarray(test.labels[:12])
    direct = kern(x, jnp.asarray(recipe.x_train)) @ jnp.asarray(recipe.weights)
    np.testing.assert_allclose(chunked(x), direct, rtol=1e-4, atol=1e-5)
    m, g = chunked.margin_and_grad(x, y)
    ref_g = jax.grad(lambda z: margin(whole(z), y).sum())(x)
    np.testing.assert_allclose(m, margin(direct, y), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=1e-3, atol=1e-4 * float(jnp.abs(ref_g).max()))
    # the chunked (explicit vjp) path and the plain jax.grad path find the same adversarial pixels
    affine = test.affine
    pix = np.clip(affine.invert(test.rows(0, 12)), 0, 1)
    attack = Attack("linf", 0.05, steps=5)
    a1 = pgd(chunked, affine.apply, pix, test.labels[:12], attack, seed=3)
    a2 = pgd(lambda z: kern(z, jnp.asarray(recipe.x_train)) @ jnp.asarray(recipe.weights), affine.apply, pix,
             test.labels[:12], attack, seed=3)
    assert np.mean(np.abs(a1 - a2) < 1e-4) > 0.99  # sign steps may flip on a few near-zero gradients


def test_batch_aligned_slices_reproduce_the_whole_run(mnist_small):
    from kernelscale.robust.run import _attack_slice, slices

    recipe = _support_recipe(mnist_small)
    attack = Attack("linf", 0.1, steps=4)
    whole = _attack_slice(recipe, mnist_small["val"], 0, 50, attack, seed=1, batch=20)
    assert slices(50, 20, 2) == [(0, 20), (20, 50)] and slices(50, 20, 5) == [(0, 20), (20, 40), (40, 50)]
    parts = [_attack_slice(recipe, mnist_small["val"], a, b, attack, seed=1, batch=20) for a, b in slices(50, 20, 2)]
    for k in ("clean", "robust", "noise"):
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    assert whole["robust"].sum() < whole["clean"].sum()


def test_distributed_attack_equals_local(mnist_small, ray_local):
    from kernelscale.robust.run import run_attack

    recipe = _support_recipe(mnist_small)
    attack = Attack("l2", 0.5, steps=4)
    local = run_attack(recipe, mnist_small["val"], 60, attack, seed=2, batch=20, workers=1)
    dist = run_attack(recipe, mnist_small["val"], 60, attack, seed=2, batch=20, workers=2)
    for k in ("clean", "robust", "noise"):
        np.testing.assert_array_equal(local[k], dist[k])


@pytest.fixture(scope="module")
def distilled_small(mnist_small, tmp_path_factory):
    from kernelscale.kip.run import distill

    out = str(tmp_path_factory.mktemp("robust") / "d.zarr")
    distill(mnist_small["train"], out=out, arch="fc:depth=2", ipc=3, steps=3, target_batch=60, progress=False)
    return out


def test_cli_evaluate_attack(distilled_small, mnist_small, capsys):
    import json

    from kernelscale.cli import main

    base = ["evaluate", distilled_small, "--test", mnist_small["val"], "--pgd-steps", "5", "--json", "--no-progress"]
    assert main(base + ["--attack", "linf:0"]) == 0
    zero = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert zero["robust_accuracy"] == zero["accuracy"] == zero["attacked_clean_accuracy"] == zero["noise_accuracy"]
    assert main(base + ["--attack", "linf:0.15", "--attack-limit", "50"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_attacked"] == 50 and res["robust_accuracy"] < res["attacked_clean_accuracy"]
    assert res["robust_accuracy"] <= res["noise_accuracy"]
    assert main(base + ["--attack", "l1:0.1"]) == 2  # bad attack: exit 2 before any compute


def test_attack_full_data_model(mnist_small, tmp_path, capsys):
    """eval --attack on a solved model: the predictor is rebuilt from the model's Gram attrs (no --data)."""
    import json

    from kernelscale.cli import main
    from kernelscale.gram.engine import compute_gram
    from kernelscale.krr import solve

    spec = kernels.parse_arch("fc:depth=2")
    gram, cross, model = (str(tmp_path / n) for n in ("g.zarr", "c.zarr", "m.zarr"))
    compute_gram(mnist_small["train"], spec, gram, tile=300, workers=1, progress=False)
    compute_gram(mnist_small["val"], spec, cross, against=mnist_small["train"], tile=300, workers=1, progress=False)
    solve(gram, mnist_small["train"], reg=1e-3, out=model, solver="cholesky", progress=False)
    args = ["eval", model, "--cross", cross, "--test", mnist_small["val"], "--pgd-steps", "5", "--chunk", "128",
            "--json", "--no-progress"]
    assert main(args + ["--attack", "linf:0"]) == 0
    zero = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the analytic predictor (chunked over 300 training rows) reproduces the cross-Gram accuracy
    assert abs(zero["attacked_clean_accuracy"] - zero["accuracy"]) <= 0.02
    assert zero["robust_accuracy"] == zero["attacked_clean_accuracy"] and zero["n_train"] == 300
    assert main(args + ["--attack", "l2:1.0", "--attack-limit", "40"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["robust_accuracy"] < res["attacked_clean_accuracy"] - 0.1
    assert main(args + ["--attack", "l2:1.0", "--data", mnist_small["val"]]) == 2  # not the model's data
