"""Kernel specifications: parsing, canonical JSON, errors, and the networks they build."""

import json

import numpy as np
import pytest

from kernelscale import kernels
from kernelscale.errors import InputError


def test_parse_defaults_and_canonical_json():
    a = kernels.parse_arch("fc")
    b = kernels.parse_arch("fc:activation=relu,depth=3,W_std=1.4142,b_std=0.05")
    assert a.canonical() == b.canonical()
    assert json.loads(a.canonical()) == {"arch": "fc", "kernel": "ntk",
                                         "params": {"W_std": 1.4142, "activation": "relu", "b_std": 0.05, "depth": 3}}
    assert kernels.parse_arch("fc", "nngp").canonical() != a.canonical()
    assert kernels.KernelSpec.from_json(a.canonical()).canonical() == a.canonical()


@pytest.mark.parametrize(
    "text, match",
    [
        ("resnet", "unknown architecture 'resnet'"),
        ("fc:depth=x", "depth='x' is not a valid int"),
        ("fc:width=3", "unknown parameter 'width'"),
        ("fc:activation=tanh", "activation must be one of"),
        ("myrtle:depth=6", "depth must be one of"),
        ("fc:depth", "expected key=value"),
        ("os.path:join", "allow_code=True"),  # the Python API names the keyword (the CLI: --allow-code)
    ],
)
def test_bad_specs_are_refused_with_a_message(text, match):
    with pytest.raises(InputError, match=match):
        kernels.parse_arch(text)


def test_bad_kernel_name():
    with pytest.raises(InputError, match="--kernel must be one of ntk, nngp"):
        kernels.parse_arch("fc", "rbf")


def test_user_code_spec(tmp_path, monkeypatch):
    mod = tmp_path / "my_arch.py"
    mod.write_text(
        "import neural_tangents.stax as stax\n"
        "def net():\n    return stax.serial(stax.Flatten(), stax.Dense(8), stax.Relu(), stax.Dense(1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = kernels.parse_arch("my_arch:net", allow_code=True)  # imports neural_tangents as users do (no set-up)
    assert spec.arch == "code" and spec.params["target"] == "my_arch:net"
    x = np.random.default_rng(0).normal(size=(3, 2, 2, 1)).astype(np.float32)
    assert np.asarray(kernels.kernel_fn(spec)(x, x, "ntk")).shape == (3, 3)


@pytest.mark.parametrize("arch", ["fc:depth=2", "convnet:depth=2", "myrtle:depth=5"])
def test_networks_build_and_kernels_are_psd(arch):
    spec = kernels.parse_arch(arch)
    shape = (8, 8, 3) if not arch.startswith("myrtle") else (32, 32, 3)
    n = 4 if not arch.startswith("myrtle") else 2
    x = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    k = np.asarray(kernels.pairwise(spec)(x, x), np.float64)
    assert k.shape == (n, n)
    np.testing.assert_allclose(k, k.T, rtol=1e-4, atol=1e-6)
    assert np.linalg.eigvalsh(k).min() > -1e-4 * np.abs(k).max()


def test_conv_memory_estimate_native_streams_and_neural_tangents_grows_with_spatial_size():
    spec = kernels.parse_arch("convnet")
    # native kernels stream pairs in bounded steps: a kernel call needs only its outputs per pair
    assert kernels.bytes_per_pair(spec, (32, 32, 3)) == kernels.bytes_per_pair(spec, (4, 4, 3)) <= 256
    # neural-tangents' (user code) keeps the full (H*W)^2 spatial covariance per pair
    code = kernels.KernelSpec("code", {"target": "m:f"}, "ntk")
    assert kernels.bytes_per_pair(code, (32, 32, 3)) > 1000 * kernels.bytes_per_pair(code, (4, 4, 3))
    assert kernels.spatial_pairs(kernels.parse_arch("fc"), (32, 32, 3)) == 1


def _reference_network(spec):
    """The same architecture built from neural-tangents' own stax.Relu (the reference for fast_relu)."""
    stax = kernels._neural_tangents().stax
    p = spec.params
    if spec.arch == "fc":
        layers = [stax.Flatten()]
        for _ in range(p["depth"]):
            layers += [stax.Dense(512, W_std=p["W_std"], b_std=p["b_std"]), stax.Relu()]
        return stax.serial(*layers, stax.Dense(1, W_std=p["W_std"], b_std=p["b_std"]))[2]
    layers = []
    for _ in range(p["depth"]):
        layers += [stax.Conv(8, (3, 3), padding="SAME", W_std=p["W_std"], b_std=p["b_std"]), stax.Relu(),
                   stax.AvgPool((2, 2), strides=(2, 2))]
    return stax.serial(*layers, stax.Flatten(), stax.Dense(1, W_std=p["W_std"], b_std=p["b_std"]))[2]


@pytest.mark.parametrize("arch, shape", [("fc:depth=3", (6, 6, 3)), ("convnet:depth=2", (8, 8, 2))])
@pytest.mark.parametrize("get", ["ntk", "nngp"])
def test_fast_relu_matches_neural_tangents_relu(arch, shape, get):
    import jax

    spec = kernels.parse_arch(arch, get)
    rng = np.random.default_rng(1)
    x1 = rng.normal(size=(12, *shape)).astype(np.float32)
    x2 = np.concatenate([x1[:3], rng.normal(size=(5, *shape)).astype(np.float32)])  # shared rows: c = 1 exactly
    ref, fast = _reference_network(spec), kernels.kernel_fn(spec, native=False)
    a, b = np.asarray(ref(x1, x2, get)), np.asarray(fast(x1, x2, get))
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * np.abs(a).max())
    # gradients through K_ss (as KIP takes them: jitted), including the diagonal where theta = 0
    def loss(fn, x):
        k = fn(x, x, get)
        return jax.numpy.sum(jax.numpy.linalg.solve(k + 0.1 * jax.numpy.eye(len(x)), jax.numpy.ones(len(x))))
    ga = np.asarray(jax.jit(jax.grad(lambda x: loss(ref, x)))(x1[:6]))
    gb = np.asarray(jax.jit(jax.grad(lambda x: loss(fast, x)))(x1[:6]))
    assert np.isfinite(gb).all()
    np.testing.assert_allclose(gb, ga, rtol=1e-3, atol=1e-3 * np.abs(ga).max())


def test_fast_atan2_accuracy():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    y, x = rng.normal(size=100000).astype(np.float32), rng.normal(size=100000).astype(np.float32)
    x[:10] = 0
    got = np.asarray(kernels._fast_atan2()(jnp.asarray(y), jnp.asarray(x)))
    np.testing.assert_allclose(got, np.arctan2(y, x), atol=4e-7)


def test_pooling_architectures_refuse_too_small_images():
    with pytest.raises(InputError, match=r"needs images of at least 32x32.*--resize 32x32"):
        kernels.check_input_shape(kernels.parse_arch("myrtle:depth=5"), (16, 16, 3))
    with pytest.raises(InputError, match=r"at least 8x8"):
        kernels.check_input_shape(kernels.parse_arch("convnet:depth=3"), (4, 4, 1))
    with pytest.raises(InputError, match=r"needs images"):
        kernels.check_input_shape(kernels.parse_arch("convnet:depth=1"), (10,))
    kernels.check_input_shape(kernels.parse_arch("convnet:depth=3"), (8, 8, 1))
    kernels.check_input_shape(kernels.parse_arch("fc"), (1, 1, 7))


def test_exported_block_kernel_equals_the_traced_one(rng):
    """The Gram driver serialises the kernel once (jax.export); actors load it instead of re-tracing."""
    from kernelscale.kernels import export_block_kernel, load_block_kernel, pairwise

    spec = kernels.parse_arch("fc:depth=2", "ntk")
    fn = pairwise(spec)
    blob = export_block_kernel(fn, 16, (5,), "float32")
    assert isinstance(blob, bytes) and blob
    x1, x2 = rng.normal(size=(16, 5)).astype(np.float32), rng.normal(size=(16, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(load_block_kernel(blob)(x1, x2)), np.asarray(fn(x1, x2)), rtol=1e-6, atol=1e-6)


def test_unexportable_kernel_returns_none():
    from kernelscale.kernels import export_block_kernel, pairwise

    def needs_concrete_values(x1, x2, get):
        return np.asarray(x1) @ np.asarray(x2).T  # numpy on tracers: cannot be traced

    assert export_block_kernel(pairwise(needs_concrete_values, "ntk"), 4, (3,), "float32") is None
