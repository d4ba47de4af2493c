"""krr.curve_arrays (the learning curve on in-memory matrices, which `kernelscale curve` runs on stored Grams)
against a direct float64 solve, and the accelerator step size of the native convolutional kernels."""

from __future__ import annotations

import numpy as np
import pytest

from kernelscale.krr import curve_arrays, effective_reg, nested_order


def test_curve_arrays_equals_a_direct_float64_solve_at_every_size():
    rng = np.random.default_rng(0)
    n, n_test, c = 120, 40, 4
    centres = rng.normal(size=(c, 6))
    labels, test_labels = rng.integers(0, c, n), rng.integers(0, c, n_test)
    x = centres[labels] + rng.normal(size=(n, 6))
    xt = centres[test_labels] + rng.normal(size=(n_test, 6))
    kern = lambda a, b: np.exp(-0.5 * ((a[:, None] - b[None]) ** 2).sum(-1) / 6)  # noqa: E731
    order = nested_order(labels, 3)
    k, kx = kern(x[order], x[order]), kern(xt, x[order])
    sizes = [20, 60, 120]
    out = curve_arrays(k, kx, labels[order], test_labels, c, sizes, reg=1e-3)
    y = np.eye(c)[labels[order]] - 1.0 / c
    for size, acc, mse in zip(sizes, out["accuracy"], out["mse"]):
        lam = effective_reg(1e-3, "trace", float(np.trace(k[:size, :size])), size)
        alpha = np.linalg.solve(k[:size, :size] + lam * np.eye(size), y[:size])
        pred = kx[:, :size] @ alpha
        assert acc == pytest.approx(np.mean(pred.argmax(1) == test_labels), abs=1e-12)
        assert mse == pytest.approx(np.mean((pred - (np.eye(c)[test_labels] - 1.0 / c)) ** 2), rel=1e-6)
    assert out["solver"] == ["cholesky"] * 3
    assert out["accuracy"][-1] > 1.5 / c  # the clusters are learnable: well above chance at full size


def test_accelerator_step_is_a_power_of_two_within_an_eighth_of_device_memory(monkeypatch):
    from kernelscale.kernels import parse_arch
    from kernelscale.kernels.native import _api

    spec = parse_arch("convnet:depth=3", "ntk")
    cpu_step = _api.pairs_per_step(spec, (32, 32, 3))
    monkeypatch.setattr(_api, "_cpu_backend", lambda: False)
    monkeypatch.setattr(_api, "_accelerator_bytes", lambda: 8 * 2**30)
    step = _api.pairs_per_step(spec, (32, 32, 3))
    per_pair = 4 * _api.LIVE_ARRAYS * _api._conv_net(spec, (32, 32, 3), True).entries_per_pair()
    assert step & (step - 1) == 0 and step * per_pair <= 8 * 2**30 < 2 * step * per_pair
    assert step > 100 * cpu_step  # an accelerator step is sized to the device, not to a CPU cache
