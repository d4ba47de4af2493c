"""The pinned stack: JAX 0.5.3 + neural-tangents 0.6.5 import and compute, without tensorflow."""

import importlib.util
import subprocess
import sys

import numpy as np


def test_tensorflow_absent():
    assert importlib.util.find_spec("tensorflow") is None, "tensorflow must not be installed in the environment"


def test_import_kernelscale_does_not_load_tensorflow_or_heavy_libs():
    code = (
        "import sys, kernelscale, kernelscale.kernels as k;"
        "spec = k.parse_arch('fc:depth=2');"
        "k.kernel_fn(spec);"  # native kernel: neural-tangents not needed
        "print('neural_tangents' in sys.modules);"
        "k.kernel_fn(spec, native=False);"  # neural-tangents' stax (the reference, user code): loads without tensorflow
        "print('tensorflow' in sys.modules, 'neural_tangents' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


def test_pinned_versions_and_kernel_value():
    import jax

    from kernelscale import kernels

    assert jax.__version__ == "0.5.3"
    assert kernels.versions()["neural_tangents"].startswith("0.6")
    spec = kernels.parse_arch("fc:depth=1,W_std=1.0,b_std=0.0,activation=relu", "nngp")
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    k = np.asarray(kernels.kernel_fn(spec)(x, x, "nngp"))
    # One ReLU layer, W_std=1, b_std=0, inputs of norm 1 in d=2: K0 = x.x'/d; K1 = arc-cosine kernel of K0.
    k0 = x @ x.T / 2
    theta = np.arccos(np.clip(k0[0, 1] / np.sqrt(k0[0, 0] * k0[1, 1]), -1, 1))
    off = np.sqrt(k0[0, 0] * k0[1, 1]) / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
    np.testing.assert_allclose(k, [[k0[0, 0] / 2, off], [off, k0[1, 1] / 2]], rtol=1e-5)
