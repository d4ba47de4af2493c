"""Finite networks: empirical NTK converges to the analytic one with width; finite training learns."""

import json

import numpy as np
import pytest

from kernelscale import kernels
from kernelscale.cli import main
from kernelscale.data import open_dataset
from kernelscale.errors import InputError
from kernelscale.kernels.finite import train_finite, width_errors


def test_empirical_ntk_error_falls_with_width(mnist_small):
    ds = open_dataset(mnist_small["train"])
    idx = np.arange(16)
    rep = width_errors(kernels.parse_arch("fc:depth=2"), ds.take(idx), ds.one_hot(idx), [32, 512, 2048],
                       seeds=2, drift_steps=20)
    assert rep.errors[0] > rep.errors[1] > rep.errors[2]
    assert rep.errors[2] < 0.15
    assert -1.0 < rep.slope < -0.25  # roughly width^-1/2
    assert rep.drift[0] > rep.drift[2] > 0  # wider networks move their NTK less (lazy regime)


def test_width_errors_refuses_nngp():
    with pytest.raises(InputError, match="--kernel ntk"):
        width_errors(kernels.parse_arch("fc", "nngp"), np.zeros((2, 2, 2, 1)), np.zeros((2, 2)), [8])


def test_train_finite_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4, 4, 1)) * 2
    labels = np.repeat(np.arange(3), 20)
    x = (centres[labels] + 0.3 * rng.normal(size=(60, 4, 4, 1))).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[labels] - 1 / 3
    res = train_finite(kernels.parse_arch("fc:depth=2"), x[::2], y[::2], x[1::2], labels[1::2],
                       width=128, epochs=100, lr=1e-2)
    assert res.train_accuracy == 1.0 and res.accuracy >= 0.9
    assert res.history[-1] < res.history[0]


def test_validate_width_cli(mnist_small, tmp_path, capsys):
    png = tmp_path / "w.png"
    code = main(["validate-width", "--data", mnist_small["train"], "--arch", "fc:depth=1", "--widths", "16,256",
                 "--rows", "8", "--seeds", "1", "--drift-steps", "5", "--plot", str(png), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["widths"] == [16, 256] and len(out["errors"]) == 2 and png.stat().st_size > 1000
    assert main(["validate-width", "--data", mnist_small["train"], "--widths", "a,b"]) == 2


def test_train_finite_cli_on_a_distilled_support(mnist_small, tmp_path, capsys):
    from kernelscale.kip.run import distill

    out = str(tmp_path / "d.zarr")
    distill(mnist_small["train"], out=out, arch="fc:depth=2", ipc=3, steps=3, target_batch=60, progress=False)
    code = main(["train-finite", out, "--test", mnist_small["val"], "--width", "128", "--epochs", "50", "--json"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_support"] == 30 and 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["kernel_accuracy"] <= 1.0
    assert res["train_accuracy"] > 0.9  # the network fits its 30 support rows
    assert abs(res["gap"] - (res["kernel_accuracy"] - res["accuracy"])) < 1e-9
