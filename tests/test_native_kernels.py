"""kernelscale's native kernels (fc, convnet, myrtle) against float64 neural-tangents with ``stax.Relu``.

Every comparison runs the native kernel in float32 and neural-tangents in float64, and bounds the error by
1e-5 of max|K|, on the diagonal (self-pairs) and off it. The compiled CPU path (numba) is compared with the
JAX path, and gradients (as KIP and PGD take them) with neural-tangents' own.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernelscale import kernels
from kernelscale.kernels import native

TOL = 1e-5  # of max|K|


def _x64():
    from jax.experimental import enable_x64

    return enable_x64()


def _reference(spec, x):
    """float64 neural-tangents (stax.Relu / stax.Erf): (nngp, ntk) of the rows x with themselves.

    One jitted call (a single XLA compile instead of neural-tangents' op-by-op dispatch); the symmetric and the
    cross block a check needs are both slices of it."""
    import jax

    with _x64():
        fn = kernels.kernel_fn(spec, fast=False, native=False)
        out = jax.jit(lambda a: fn(a, None, ("nngp", "ntk")))(np.asarray(x, np.float64))
        return [np.asarray(k, np.float64) for k in out]


def _native(spec, x1, x2):
    out = native.kernel_fn(spec)(np.asarray(x1, np.float32), None if x2 is None else np.asarray(x2, np.float32),
                                 ("nngp", "ntk"))
    return [np.asarray(k, np.float64) for k in out]


def _check(spec, shape, n1, n2, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(n1, *shape)).astype(np.float32)
    new = rng.normal(size=(n2, *shape)).astype(np.float32)
    # x2 shares two rows with x1: correlation 1 off the diagonal of a symmetric block too
    x2 = np.concatenate([x1[:2], new])
    # the reference over the union of the rows: x1's symmetric block and the (x1, x2) cross block are slices of it
    full = _reference(spec, np.concatenate([x1, new]))
    cols = np.r_[np.arange(min(2, n1)), n1 + np.arange(n2)]
    for a, b in ((x1, None), (x1, x2)):
        refs = [k[:n1, :n1] if b is None else k[:n1][:, cols] for k in full]
        for name, ref, got in zip(("nngp", "ntk"), refs, _native(spec, a, b)):
            scale = np.abs(ref).max()
            err = np.abs(got - ref) / scale
            where = "symmetric" if b is None else "cross"
            assert err.max() <= TOL, f"{spec.describe()} {name} {where}: max error {err.max():.2e} of max|K|"
            if b is None:
                assert np.diagonal(err).max() <= TOL, f"{spec.describe()} {name}: diagonal off by {np.diagonal(err).max():.2e}"


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_fc_equals_float64_neural_tangents(depth, activation):
    _check(kernels.parse_arch(f"fc:depth={depth},activation={activation}"), (8, 8, 3), 6, 3)


# every layout the native kernels choose: bands of offset 1 and 3 (depth 1, 2 at 8x8), the full layout (depth 3 at
# 8x8, depth 4 at 16x16), a band of offset 7 narrower than the image (depth 3 at 16x16) and KIP's 32x32 ConvNet
@pytest.mark.parametrize("depth, side", [(1, 8), (2, 8), (3, 8), (3, 16), (4, 16), (3, 32)])
def test_convnet_equals_float64_neural_tangents(depth, side):
    _check(kernels.parse_arch(f"convnet:depth={depth}"), (side, side, 3), 4 if side < 32 else 1, 2 if side < 32 else 1)


@pytest.mark.parametrize("depth", [5, 7, 10])
def test_myrtle_equals_float64_neural_tangents(depth):
    _check(kernels.parse_arch(f"myrtle:depth={depth}"), (32, 32, 3), 1, 1)


def test_random_specs_equal_float64_neural_tangents():
    """Property-style: random architectures, W_std in [0.5, 2.5], b_std in [0, 1], depths, image sizes."""
    rng = np.random.default_rng(7)
    for trial in range(4):
        w_std, b_std = rng.uniform(0.5, 2.5), rng.uniform(0.0, 1.0)
        if trial % 2 == 0:
            arch, shape = f"fc:depth={rng.integers(1, 5)},W_std={w_std:.4f},b_std={b_std:.4f}", (5, 5, 2)
        else:
            side = int(rng.choice([8, 12, 16]))
            arch, shape = f"convnet:depth={rng.integers(1, 4)},W_std={w_std:.4f},b_std={b_std:.4f}", (side, side, 2)
        _check(kernels.parse_arch(arch), shape, 4, 2, seed=trial)


def test_constant_images_give_exact_diagonals():
    """Zero backgrounds (MNIST-like) and constant images: correlation exactly 1 at many positions."""
    rng = np.random.default_rng(3)
    x = np.zeros((4, 16, 16, 1), np.float32)
    x[0, 4:9, 5:11] = rng.normal(size=(5, 6, 1))
    x[1] = 1.0
    x[2, 8:] = 2.0
    x[3] = rng.normal(size=(16, 16, 1))
    for arch in ("convnet:depth=3,b_std=0.0", "convnet:depth=2,b_std=0.3", "fc:depth=3,b_std=0.0"):
        spec = kernels.parse_arch(arch)
        for name, ref, got in zip(("nngp", "ntk"), _reference(spec, x), _native(spec, x, None)):
            assert np.isfinite(got).all()
            assert np.abs(got - ref).max() <= TOL * np.abs(ref).max(), f"{arch} {name}"


@pytest.mark.parametrize("arch, shape, get", [("fc:depth=3", (6, 6, 3), "ntk"), ("fc:depth=2", (6, 6, 3), "nngp"),
                                              ("convnet:depth=2", (8, 8, 1), "nngp"),
                                              ("convnet:depth=3", (8, 8, 1), "ntk")])
def test_gradients_equal_float64_neural_tangents(arch, shape, get):
    """d/dx of a KIP-style loss through K_ss and K_ts (both arguments), including self-pairs (theta = 0)."""
    import jax
    import jax.numpy as jnp

    spec = kernels.parse_arch(arch, get)
    rng = np.random.default_rng(2)
    xs = rng.normal(size=(2, *shape)).astype(np.float32)
    xt = rng.normal(size=(2, *shape)).astype(np.float32)
    yt = rng.normal(size=(2, 2))

    def loss(fn, s, t):
        k_ss = fn(s, s, get)
        k_ts = fn(t, s, get)
        w = jnp.linalg.solve(k_ss + 0.1 * jnp.trace(k_ss) / len(s) * jnp.eye(len(s)), jnp.ones((len(s), 2)))
        return jnp.sum((k_ts @ w - yt) ** 2)

    with _x64():  # jitted: one XLA compile of the reference gradient instead of neural-tangents' op-by-op dispatch
        ref_fn = kernels.kernel_fn(spec, fast=False, native=False)
        g_ref = jax.jit(jax.grad(lambda s, t: loss(ref_fn, s, t), argnums=(0, 1)))(xs.astype(np.float64),
                                                                                 xt.astype(np.float64))
    g_nat = jax.grad(lambda s, t: loss(native.kernel_fn(spec), s, t), argnums=(0, 1))(xs, xt)
    for ref, got in zip(g_ref, g_nat):
        ref, got = np.asarray(ref), np.asarray(got, np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("arch, shape, kernel", [
    ("convnet:depth=3", (32, 32, 3), "ntk"),
    ("convnet:depth=1", (8, 8, 3), "nngp"),
    ("convnet:depth=2,b_std=0.0", (12, 10, 1), "ntk"),  # non-square, odd pooled sizes
    ("convnet:depth=4,W_std=1.2,b_std=0.4", (16, 16, 2), "nngp"),
    ("myrtle:depth=5", (32, 32, 3), "ntk"),
    ("myrtle:depth=7", (32, 32, 1), "nngp"),
])
def test_compiled_cpu_path_equals_jax_path(arch, shape, kernel):
    from kernelscale.kernels.native._api import CpuGram

    spec = kernels.parse_arch(arch, kernel)
    rng = np.random.default_rng(5)
    n = 3 if shape[0] == 32 else 5
    x1 = rng.normal(size=(n, *shape)).astype(np.float32)
    x2 = np.concatenate([x1[:1], rng.normal(size=(2, *shape)).astype(np.float32)])
    cpu = CpuGram(spec, threads=2)
    jax_block, jax_sym = native.block_kernel(spec), native.symmetric_kernel(spec)
    for got, want in ((cpu.block(x1, x2), jax_block(x1, x2)), (cpu.symmetric(x1), jax_sym(x1))):
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    sym = cpu.symmetric(x1)
    assert np.array_equal(sym, sym.T)


def test_symmetric_call_equals_block_call_off_the_diagonal():
    """g(x) computes each unordered pair once: the same numbers as the full block f(x, x) off the diagonal."""
    spec = kernels.parse_arch("convnet:depth=2")
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
    f, g = kernels.gram_calls(spec)
    full, sym = np.asarray(f(x, x)), np.asarray(g(x))
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_allclose(sym[off], full[off], rtol=1e-6)


def test_band_layout_keeps_only_the_offsets_flatten_needs():
    from kernelscale.kernels.native._conv import ConvNet
    from kernelscale.kernels.native._layouts import BandLayout, FullLayout

    lay = ConvNet.convnet(3, 1.4, 0.05, 32, 32).layout()
    assert isinstance(lay, BandLayout) and (lay.dy, lay.dx) == (7, 7)  # 2**3 - 1 after three pools
    assert ConvNet.convnet(3, 1.4, 0.05, 32, 32).entries_per_pair() == 15 * 32 * 15 * 32
    assert isinstance(ConvNet.myrtle(5, 1.4, 0.0, 32, 32).layout(), FullLayout)  # global pooling: every offset
    assert isinstance(ConvNet.convnet(3, 1.4, 0.05, 8, 8).layout(), FullLayout)  # the band covers the image


def test_native_kernels_are_used_by_default_and_neural_tangents_for_user_code():
    assert native.supports(kernels.parse_arch("convnet")) and native.supports(kernels.parse_arch("myrtle"))
    assert native.supports(kernels.parse_arch("fc:activation=erf"))
    assert not native.supports(kernels.parse_arch("fc:activation=gelu"))
    assert kernels.KERNEL_IMPL_VERSION == "3"
    assert kernels.versions()["kernel_impl"] == "3"
