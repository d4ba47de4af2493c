"""neural-tangents ``stax`` networks: the built-in architectures as networks, user code's networks, a faster
ReLU layer, and the neural-tangents entry points kernelscale uses.

This is the only module that imports neural-tangents (0.6.5). neural-tangents declares tensorflow as a
requirement but needs it only in ``neural_tangents.experimental``; we keep that subpackage from loading,
so kernelscale imports without tensorflow.
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Callable

import numpy as np

from kernelscale.errors import InputError
from kernelscale.kernels.spec import MYRTLE_LAYERS, KernelFn, KernelSpec, code_allowed
from kernelscale.runtime import install_nt_stub


def _neural_tangents() -> types.ModuleType:
    """Import neural-tangents without ``neural_tangents.experimental`` (which would import tensorflow)."""
    install_nt_stub()  # already done by `import kernelscale`; kept for callers that loaded this module alone
    try:
        import neural_tangents  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - only on a broken environment
        raise InputError(
            f"neural-tangents is not importable ({exc}). Install it without its tensorflow requirement: "
            "pip install --no-deps neural-tangents==0.6.5 (or run `make test`, which builds .venv)."
        ) from exc
    return neural_tangents


def _code_network(spec: KernelSpec) -> tuple[Callable, Callable, KernelFn]:
    """The ``stax`` triple of a ``code`` spec, only after ``--allow-code`` checked its source hash in this process."""
    target = str(spec.params.get("target"))
    if not code_allowed(spec):
        raise InputError(f"the kernel spec names user code ({target}); it is imported only with --allow-code "
                         "(API: parse_arch(..., allow_code=True) or load_spec(..., allow_code=True))")
    module, _, function = target.partition(":")
    out = getattr(importlib.import_module(module), function)()
    if isinstance(out, tuple) and len(out) == 3:
        return out
    raise InputError(f"--arch {target}: the function must return a stax (init_fn, apply_fn, kernel_fn) triple")


# ----------------------------------------------------------------------------------------------------------
# A faster ReLU layer (same kernel, same neural-tangents stax machinery)
# ----------------------------------------------------------------------------------------------------------
#: Bumped whenever kernel numerics change; enters every Gram fingerprint through :func:`versions`.
KERNEL_IMPL_VERSION = "3"  # 2: ReLU through fast_relu (polynomial arctan2); 3: native structured kernels


def _fast_atan2() -> Callable:
    """``atan2(y, x)`` for float32 from Cephes' atanf polynomial (~1e-7 relative error).

    XLA's CPU ``atan2`` costs ~30 ns per element (measured: 129 ms for 4M elements, vs 1 ms for this), and
    neural-tangents' ReLU kernel calls it once per kernel entry and layer: it was 2/3 of an fc NTK tile.
    The derivative is neural-tangents' own (finite where y = x = 0), so gradients through K(x, x) are safe.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    pi = float(np.pi)

    @jax.custom_jvp
    def atan2(y: Any, x: Any) -> Any:
        ay, ax = jnp.abs(y), jnp.abs(x)
        hi, lo = jnp.maximum(ax, ay), jnp.minimum(ax, ay)
        a = lo / jnp.where(hi == 0, 1.0, hi)  # in [0, 1]
        big = a > 0.41421356  # tan(pi/8): reduce with atan(a) = pi/4 + atan((a-1)/(a+1))
        t = jnp.where(big, (a - 1) / (a + 1), a)
        z = t * t
        r = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t + t
        r = jnp.where(big, r + pi / 4, r)
        r = jnp.where(ay > ax, pi / 2 - r, r)
        r = jnp.where(x < 0, pi - r, r)
        r = jnp.where(y < 0, -r, r)
        return jnp.where((x == 0) & (y == 0), pi / 2, r)

    @atan2.defjvp
    def _atan2_jvp(primals: Any, tangents: Any) -> Any:
        y, x = primals
        y_dot, x_dot = tangents
        denom = jnp.maximum(x**2 + y**2, 1e-30)
        return atan2(y, x), y_dot * (x / denom) - x_dot * (y / denom)

    return atan2


def fast_relu() -> tuple[Callable, Callable, KernelFn]:
    """ReLU as a neural-tangents ``stax.Elementwise`` layer with its closed-form arc-cosine kernel.

    nngp(c12, v1, v2) = (s + (pi - theta) c12) / (2 pi), with s = sqrt(v1 v2 - c12^2), theta = atan2(s, c12);
    d_nngp = (pi - theta) / (2 pi). Identical to ``stax.Relu`` up to float32 rounding (tested), 1.5x faster
    on fc NTK tiles and 2x on convolutional ones (measured on this machine).
    """
    import jax.numpy as jnp  # noqa: PLC0415

    from kernelscale.kernels.native._arccos import safe_sqrt as sqrt  # noqa: PLC0415  (native imports jax)

    stax = _neural_tangents().stax
    atan2 = _fast_atan2()
    two_pi = 2 * float(np.pi)

    def relu_nngp(cov12: Any, var1: Any, var2: Any) -> Any:
        s = sqrt(var1 * var2 - cov12**2)
        return (s + (np.pi - atan2(s, cov12)) * cov12) / two_pi

    def relu_d_nngp(cov12: Any, var1: Any, var2: Any) -> Any:
        s = sqrt(var1 * var2 - cov12**2)
        return (np.pi - atan2(s, cov12)) / two_pi

    def relu(x: Any) -> Any:
        return jnp.maximum(x, 0)

    return stax.Elementwise(relu, relu_nngp, relu_d_nngp)


def network(spec: KernelSpec, width: int = 512, out_dim: int = 1, *, fast: bool = True
            ) -> tuple[Callable, Callable, KernelFn]:
    """The ``stax`` triple ``(init_fn, apply_fn, kernel_fn)`` of a spec.

    ``width`` sets the finite hidden widths (channels for convolutions) and ``out_dim`` the readout size; the
    analytic ``kernel_fn`` depends on neither (NTK parameterisation). ``fast=False`` builds ReLUs from
    neural-tangents' own ``stax.Relu`` (the reference the benchmarks compare against) instead of
    :func:`fast_relu`.
    """
    nt = _neural_tangents()
    stax = nt.stax
    relu = fast_relu if fast else stax.Relu
    p = spec.params
    if spec.arch == "fc":
        act = {"relu": relu, "erf": stax.Erf, "gelu": stax.Gelu}[p["activation"]]
        layers = [stax.Flatten()]
        for _ in range(p["depth"]):
            layers += [stax.Dense(width, W_std=p["W_std"], b_std=p["b_std"]), act()]
        layers.append(stax.Dense(out_dim, W_std=p["W_std"], b_std=p["b_std"]))
        return stax.serial(*layers)
    if spec.arch == "convnet":
        layers = []
        for _ in range(p["depth"]):
            layers += [
                stax.Conv(width, (3, 3), padding="SAME", W_std=p["W_std"], b_std=p["b_std"]),
                relu(),
                stax.AvgPool((2, 2), strides=(2, 2)),
            ]
        layers += [stax.Flatten(), stax.Dense(out_dim, W_std=p["W_std"], b_std=p["b_std"])]
        return stax.serial(*layers)
    if spec.arch == "myrtle":
        # Shankar et al. 2020, as in neural-tangents' examples/myrtle.
        a, b, c = MYRTLE_LAYERS[p["depth"]]

        def conv() -> Any:
            return stax.Conv(width, (3, 3), padding="SAME", W_std=p["W_std"], b_std=p["b_std"])

        layers = [conv(), relu()] * a + [stax.AvgPool((2, 2), strides=(2, 2))]
        layers += [conv(), relu()] * b + [stax.AvgPool((2, 2), strides=(2, 2))]
        layers += [conv(), relu()] * c + [stax.AvgPool((2, 2), strides=(2, 2))] * 3
        layers += [stax.Flatten(), stax.Dense(out_dim, W_std=p["W_std"], b_std=p["b_std"])]
        return stax.serial(*layers)
    if spec.arch == "code":
        return _code_network(spec)
    raise InputError(f"unknown architecture {spec.arch!r}")


def empirical_ntk_fn(apply_fn: Callable, **kwargs: Any) -> Callable:
    """neural-tangents' empirical NTK ``f(x1, x2, params)`` of a finite network (finite-width validation).

    Defaults to the NTK-vector-products implementation: with JAX 0.5.3 neural-tangents' structured
    derivatives (implementation 3) fail, and Jacobian contraction is ~4x slower at width 4096 (measured).
    """
    kwargs.setdefault("implementation", 2)
    return _neural_tangents().empirical_ntk_fn(apply_fn, **kwargs)


def nt_batch(fn: KernelFn, batch_size: int, **kwargs: Any) -> KernelFn:
    """``neural_tangents.batch`` (the baseline the Gram engine is benchmarked against)."""
    return _neural_tangents().batch(fn, batch_size=batch_size, **kwargs)


def versions() -> dict[str, str]:
    """Versions of the libraries whose numerics enter a Gram's fingerprint."""
    import jax  # noqa: PLC0415
    import numba  # noqa: PLC0415

    nt = _neural_tangents()
    return {"neural_tangents": getattr(nt, "__version__", "0.6.5"), "jax": jax.__version__,
            "numba": numba.__version__, "kernel_impl": KERNEL_IMPL_VERSION}
