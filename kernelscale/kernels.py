"""Kernel specifications and kernel functions.

This is the only module that imports neural-tangents (0.6.5). neural-tangents declares tensorflow as a
requirement but needs it only in ``neural_tangents.experimental``; we keep that subpackage from loading,
so kernelscale imports without tensorflow.

A kernel is named by a :class:`KernelSpec` (architecture name, parameters, ``ntk``/``nngp``), written on the
command line as ``--arch NAME[:key=value,...] --kernel ntk|nngp`` and canonicalised to JSON, which enters
every fingerprint. Any ``kernel_fn(x1, x2, get)`` callable (e.g. from a user's ``stax.serial``) works too.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

KernelFn = Callable[..., Any]

#: Architecture name -> default parameters. Values given on the command line are cast to these types.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "fc": {"depth": 3, "W_std": 1.4142, "b_std": 0.05, "activation": "relu"},
    "convnet": {"depth": 3, "W_std": 1.4142, "b_std": 0.05},
    "myrtle": {"depth": 5, "W_std": 1.4142, "b_std": 0.0},
}
ACTIVATIONS = ("relu", "erf", "gelu")
MYRTLE_LAYERS = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}
KERNELS = ("ntk", "nngp")


def _neural_tangents() -> types.ModuleType:
    """Import neural-tangents without ``neural_tangents.experimental`` (which would import tensorflow)."""
    if "neural_tangents" not in sys.modules:
        sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    try:
        import neural_tangents  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - only on a broken environment
        raise InputError(
            f"neural-tangents is not importable ({exc}). Install it without its tensorflow requirement: "
            "pip install --no-deps neural-tangents==0.6.5 (or run `make test`, which builds .venv)."
        ) from exc
    return neural_tangents


@dataclass(frozen=True)
class KernelSpec:
    """A named infinite-width kernel: architecture + parameters + which kernel (ntk or nngp)."""

    arch: str
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    kernel: str = "ntk"

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "params": dict(sorted(self.params.items())), "kernel": self.kernel}

    def canonical(self) -> str:
        """Canonical JSON string (sorted keys, no spaces): what fingerprints hash."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.arch}:{args} ({self.kernel})"

    @classmethod
    def from_json(cls, obj: dict[str, Any] | str) -> "KernelSpec":
        if isinstance(obj, str):
            obj = json.loads(obj)
        return cls(arch=obj["arch"], params=dict(obj.get("params", {})), kernel=obj.get("kernel", "ntk"))

    def with_kernel(self, kernel: str) -> "KernelSpec":
        return KernelSpec(self.arch, dict(self.params), _check_kernel(kernel))


def _check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise InputError(f"--kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return kernel


def _cast(name: str, key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise InputError(f"--arch {name}: {key}={raw!r} is not a valid {type(default).__name__}") from None
    return raw


def parse_arch(text: str, kernel: str = "ntk", *, allow_code: bool = False) -> KernelSpec:
    """Parse ``NAME[:key=value,...]`` (or ``module.path:function`` with ``allow_code``) into a spec.

    >>> parse_arch("fc:depth=2").params["depth"]
    2
    """
    _check_kernel(kernel)
    text = text.strip()
    name, _, rest = text.partition(":")
    if name not in ARCH_DEFAULTS:
        if rest.isidentifier():
            if not allow_code:
                raise InputError(
                    f"--arch {text!r} names user code; loading code needs the explicit --allow-code flag"
                )
            return _code_spec(name, rest, kernel)
        raise InputError(
            f"unknown architecture {name!r}: use one of {', '.join(ARCH_DEFAULTS)} "
            "(e.g. fc:depth=3,W_std=1.4142,b_std=0.05,activation=relu), or module.path:function with --allow-code"
        )
    defaults = ARCH_DEFAULTS[name]
    params = dict(defaults)
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise InputError(f"--arch {text!r}: expected key=value, got {item!r}")
        if key not in defaults:
            raise InputError(f"--arch {name}: unknown parameter {key!r}; known: {', '.join(defaults)}")
        params[key] = _cast(name, key, raw, defaults[key])
    _validate(name, params)
    return KernelSpec(name, params, kernel)


def _validate(name: str, params: dict[str, Any]) -> None:
    if name == "fc" and params["activation"] not in ACTIVATIONS:
        raise InputError(f"--arch fc: activation must be one of {', '.join(ACTIVATIONS)}")
    if name == "myrtle" and params["depth"] not in MYRTLE_LAYERS:
        raise InputError(f"--arch myrtle: depth must be one of {sorted(MYRTLE_LAYERS)}")
    if params.get("depth", 1) < 1:
        raise InputError(f"--arch {name}: depth must be >= 1")
    if params.get("W_std", 1.0) <= 0 or params.get("b_std", 0.0) < 0:
        raise InputError(f"--arch {name}: need W_std > 0 and b_std >= 0")


def _code_spec(module: str, function: str, kernel: str) -> KernelSpec:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"--arch {module}:{function}: cannot import {module!r}: {exc}") from exc
    if not callable(getattr(mod, function, None)):
        raise InputError(f"--arch {module}:{function}: {module!r} has no callable {function!r}")
    try:
        source = inspect.getsource(mod)
    except (OSError, TypeError):
        source = module
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return KernelSpec("code", {"target": f"{module}:{function}", "source_sha256": digest}, kernel)


# ----------------------------------------------------------------------------------------------------------
# A faster ReLU layer (same kernel, same neural-tangents stax machinery)
# ----------------------------------------------------------------------------------------------------------
#: Bumped whenever kernel numerics change; enters every Gram fingerprint through :func:`versions`.
KERNEL_IMPL_VERSION = "2"  # 2: ReLU through fast_relu (polynomial arctan2)


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


def _safe_sqrt() -> Callable:
    """``sqrt(max(x, 0))`` with a zero derivative at 0 (as neural-tangents' ``_sqrt``)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    @jax.custom_jvp
    def sqrt(x: Any) -> Any:
        return jnp.sqrt(jnp.maximum(x, 0.0))

    @sqrt.defjvp
    def _sqrt_jvp(primals: Any, tangents: Any) -> Any:
        (x,), (x_dot,) = primals, tangents
        root = jnp.sqrt(jnp.maximum(x, 1e-30))
        return sqrt(x), jnp.where(x > 1e-30, x_dot / (2 * root), 0.0)

    return sqrt


def fast_relu() -> tuple[Callable, Callable, KernelFn]:
    """ReLU as a neural-tangents ``stax.Elementwise`` layer with its closed-form arc-cosine kernel.

    nngp(c12, v1, v2) = (s + (pi - theta) c12) / (2 pi), with s = sqrt(v1 v2 - c12^2), theta = atan2(s, c12);
    d_nngp = (pi - theta) / (2 pi). Identical to ``stax.Relu`` up to float32 rounding (tested), 1.5x faster
    on fc NTK tiles and 2x on convolutional ones (measured on this machine).
    """
    import jax.numpy as jnp  # noqa: PLC0415

    stax = _neural_tangents().stax
    atan2, sqrt = _fast_atan2(), _safe_sqrt()
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
        module, _, function = p["target"].partition(":")
        out = getattr(importlib.import_module(module), function)()
        if isinstance(out, tuple) and len(out) == 3:
            return out
        raise InputError(f"--arch {p['target']}: the function must return a stax (init_fn, apply_fn, kernel_fn) triple")
    raise InputError(f"unknown architecture {spec.arch!r}")


def kernel_fn(spec: KernelSpec, *, fast: bool = True) -> KernelFn:
    """The analytic ``kernel_fn(x1, x2, get)`` of a spec (``fast=False``: with neural-tangents' stax.Relu)."""
    return network(spec, fast=fast)[2]


def pairwise(spec_or_fn: KernelSpec | KernelFn, get: str | None = None) -> Callable[[Any, Any], Any]:
    """A jitted ``f(x1, x2) -> (n1, n2)`` kernel block for a spec (its kernel) or a kernel_fn + ``get``."""
    import jax  # noqa: PLC0415

    if isinstance(spec_or_fn, KernelSpec):
        fn, get = kernel_fn(spec_or_fn), spec_or_fn.kernel
    else:
        fn, get = spec_or_fn, get or "ntk"
    return jax.jit(lambda x1, x2: fn(x1, x2, get))


def export_block_kernel(fn: Callable[[Any, Any], Any], rows: int, input_shape: tuple[int, ...], dtype: str
                        ) -> bytes | None:
    """Serialise a jitted block kernel ``fn(x1, x2)`` for ``(rows, *input_shape)`` inputs (``jax.export``).

    The Gram driver traces the kernel once while its actors start, and every actor compiles the serialised
    program instead of re-tracing neural-tangents (~0.4 s per actor for an fc NTK here, more for deep
    convnets). Returns None when the function cannot be exported (an actor then traces it itself).
    """
    import jax  # noqa: PLC0415
    from jax import export  # noqa: PLC0415

    try:
        spec = jax.ShapeDtypeStruct((rows, *input_shape), dtype)
        return bytes(export.export(fn)(spec, spec).serialize())
    except Exception as exc:  # noqa: BLE001 - any failure only costs the actors a local trace
        log.debug("kernel not exportable (%s); actors trace it themselves", exc)
        return None


def load_block_kernel(blob: bytes) -> Callable[[Any, Any], Any]:
    """The jitted ``f(x1, x2)`` of a :func:`export_block_kernel` blob (compiled on its first call)."""
    import jax  # noqa: PLC0415
    from jax import export  # noqa: PLC0415

    return jax.jit(export.deserialize(bytearray(blob)).call)


def check_input_shape(spec: KernelSpec, input_shape: tuple[int, ...]) -> None:
    """Refuse inputs the architecture cannot take (before any compute): pooling needs images big enough.

    ``convnet:depth=d`` halves the image ``d`` times and ``myrtle`` five times, so each side must be at least
    ``2**pools`` pixels (neural-tangents would otherwise fail deep inside a worker).
    """
    pools = {"convnet": spec.params.get("depth", 0), "myrtle": 5}.get(spec.arch, 0)
    if not pools:
        return
    if len(input_shape) != 3:
        raise InputError(f"--arch {spec.arch} needs images (H, W, C); the data has rows of shape {input_shape}")
    need = 2**pools
    if min(input_shape[0], input_shape[1]) < need:
        raise InputError(
            f"--arch {spec.describe()} pools {pools} times and needs images of at least {need}x{need}; the data "
            f"is {input_shape[0]}x{input_shape[1]}: ingest with --resize {need}x{need} (or larger) or use fewer layers"
        )


def spatial_pairs(spec: KernelSpec, input_shape: tuple[int, ...]) -> int:
    """How many spatial covariance entries neural-tangents keeps per pair of inputs.

    fc kernels keep one number per pair; convolutional kernels with pooling keep the full spatial
    covariance, ``(H*W)**2`` per pair, which is what makes them ~10^6 times costlier in memory.
    """
    if spec.arch in ("convnet", "myrtle", "code") and len(input_shape) == 3:
        h, w = input_shape[0], input_shape[1]
        return (h * w) ** 2
    return 1


def bytes_per_pair(spec: KernelSpec, input_shape: tuple[int, ...]) -> int:
    """Estimated peak bytes per (x1, x2) pair in one kernel call (float32 intermediates, with headroom)."""
    live_arrays = 16  # nngp, ntk, cov1, cov2 and temporaries, measured to stay below this
    return 4 * live_arrays * spatial_pairs(spec, input_shape) + 64


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

    nt = _neural_tangents()
    return {"neural_tangents": getattr(nt, "__version__", "0.6.5"), "jax": jax.__version__,
            "kernel_impl": KERNEL_IMPL_VERSION}
