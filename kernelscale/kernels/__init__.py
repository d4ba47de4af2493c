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
import json
import logging
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kernelscale.errors import InputError
from kernelscale.kernels.source import CallableKernel, KernelSource, traced_bytes_per_pair

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
    from kernelscale.runtime import install_nt_stub  # noqa: PLC0415

    install_nt_stub()  # already done by `import kernelscale`; kept for callers that loaded this module alone
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

    # -- KernelSource (kernelscale.kernels.source) ----------------------------------------------------------
    def block_fn(self) -> Callable[[Any, Any], Any]:
        """The jitted ``f(x1, x2) -> (n1, n2)`` of this spec's kernel (:func:`pairwise`)."""
        return pairwise(self)

    def bytes_per_pair(self, input_shape: tuple[int, ...]) -> int:
        """Peak bytes per pair of one kernel call: known for built-in kernels (:func:`bytes_per_pair`), measured
        from the traced program for user code (:func:`~kernelscale.kernels.source.traced_bytes_per_pair`)."""
        if self.arch == "code":
            return traced_bytes_per_pair(self.block_fn(), input_shape)
        return bytes_per_pair(self, input_shape)

    def fixed_bytes(self, input_shape: tuple[int, ...]) -> int:
        """Working bytes of one kernel call that do not grow with its pairs (:func:`fixed_bytes`)."""
        return 0 if self.arch == "code" else fixed_bytes(self, input_shape)


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


#: Largest ``depth`` of an fc/convnet spec (deeper kernels only repeat a layer's map; a huge depth would hang).
MAX_DEPTH = 100


def _validate(name: str, params: dict[str, Any]) -> None:
    if name == "fc" and params["activation"] not in ACTIVATIONS:
        raise InputError(f"--arch fc: activation must be one of {', '.join(ACTIVATIONS)}")
    if name == "myrtle" and params["depth"] not in MYRTLE_LAYERS:
        raise InputError(f"--arch myrtle: depth must be one of {sorted(MYRTLE_LAYERS)}")
    if not 1 <= params.get("depth", 1) <= MAX_DEPTH:
        raise InputError(f"--arch {name}: depth must be in 1..{MAX_DEPTH}, got {params.get('depth')}")
    w_std, b_std = params.get("W_std", 1.0), params.get("b_std", 0.0)
    if not (math.isfinite(w_std) and math.isfinite(b_std)):
        raise InputError(f"--arch {name}: W_std and b_std must be finite numbers, got W_std={w_std}, b_std={b_std}")
    if w_std <= 0 or b_std < 0:
        raise InputError(f"--arch {name}: need W_std > 0 and b_std >= 0")


#: Canonical specs of user code this process may import: added only by ``parse_arch(..., allow_code=True)`` and
#: ``load_spec(..., allow_code=True)`` after the source hash matched. ``network`` refuses any other code spec.
_ALLOWED_CODE: set[str] = set()


def _source_digest(target: str) -> str:
    """sha256 (first 16 hex digits) of the source file of ``module`` in ``module:function``, read without importing
    the module (its parent packages are imported to find it). The same text ``inspect.getsource`` returns."""
    import importlib.util  # noqa: PLC0415
    import tokenize  # noqa: PLC0415

    module = target.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise InputError(f"--arch {target}: cannot find module {module!r}: {exc}") from None
    origin = getattr(found, "origin", None)
    if found is None or not origin or not str(origin).endswith(".py") or not os.path.isfile(origin):
        raise InputError(f"--arch {target}: no Python source file for module {module!r} (user code must be a .py "
                         "module on the Python path)")
    with tokenize.open(origin) as f:
        source = f.read()
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _code_spec(module: str, function: str, kernel: str) -> KernelSpec:
    target = f"{module}:{function}"
    digest = _source_digest(target)  # hashed before the import runs it, so the hash names the code that runs
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"--arch {target}: cannot import {module!r}: {exc}") from exc
    if not callable(getattr(mod, function, None)):
        raise InputError(f"--arch {target}: {module!r} has no callable {function!r}")
    spec = KernelSpec("code", {"target": target, "source_sha256": digest}, kernel)
    _ALLOWED_CODE.add(spec.canonical())
    return spec


def load_spec(obj: Any, *, allow_code: bool = False, where: str = "the store") -> KernelSpec:
    """A kernel spec read from a store (untrusted input), checked like one typed on the command line.

    Built-in architectures: known name, known parameters of the right types and in range (finite stds, depth
    bounded). A ``code`` spec is refused unless ``allow_code`` (the command's ``--allow-code``), and then only when
    the module's current source matches the recorded ``source_sha256``; nothing is imported before that.
    """
    try:
        spec = KernelSpec.from_json(obj)
        if not (isinstance(spec.arch, str) and isinstance(spec.params, dict) and isinstance(spec.kernel, str)):
            raise TypeError("arch/params/kernel of the wrong type")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{where}: its kernel spec is malformed ({exc}): {str(obj)[:120]}") from None
    if spec.kernel not in KERNELS:
        raise InputError(f"{where}: its kernel spec names kernel {spec.kernel!r}; expected one of {', '.join(KERNELS)}")
    if spec.arch == "code":
        target, digest = spec.params.get("target"), spec.params.get("source_sha256")
        module, _, function = str(target).partition(":")
        if (set(spec.params) != {"target", "source_sha256"} or not isinstance(digest, str)
                or not all(p.isidentifier() for p in module.split(".")) or not function.isidentifier()):
            raise InputError(f"{where}: its kernel spec names user code in a malformed way: {spec.params}")
        if not allow_code:
            raise InputError(f"{where} was computed with user code ({target}); kernelscale imports it only when the "
                             "command is given --allow-code (API: allow_code=True): pass it only if you trust that code")
        actual = _source_digest(target)
        if actual != digest:
            raise InputError(f"{where}: user code {target} has changed since the store was made (source sha256 "
                             f"{actual} != recorded {digest}); refusing to run other code than the store was built "
                             "with: restore that code, or recompute the store with the current one")
        _ALLOWED_CODE.add(spec.canonical())
        return spec
    if spec.arch == "callable":
        raise InputError(f"{where} was computed from a user kernel_fn callable; pass that function again (Python API)")
    if spec.arch not in ARCH_DEFAULTS:
        raise InputError(f"{where}: its kernel spec names unknown architecture {spec.arch!r}; known: "
                         f"{', '.join(ARCH_DEFAULTS)}")
    defaults = ARCH_DEFAULTS[spec.arch]
    params = dict(defaults)
    for key, value in spec.params.items():
        default = defaults.get(key)
        ok = key in defaults and (isinstance(value, bool) if isinstance(default, bool) else
                                  isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int) else
                                  isinstance(value, (int, float)) and not isinstance(value, bool)
                                  if isinstance(default, float) else isinstance(value, str))
        if not ok:
            raise InputError(f"{where}: its kernel spec has parameter {key}={value!r}; expected one of "
                             f"{', '.join(f'{k} ({type(v).__name__})' for k, v in defaults.items())}")
        params[key] = value  # the stored value itself: a complete stored spec keeps its canonical form
    try:
        _validate(spec.arch, params)
    except InputError as exc:
        raise InputError(f"{where}: its kernel spec is out of range: {exc}") from None
    return KernelSpec(spec.arch, params, spec.kernel)


def code_allowed(spec: KernelSpec) -> bool:
    """Whether this process may import the user code of a ``code`` spec (see :func:`load_spec`)."""
    return spec.canonical() in _ALLOWED_CODE


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

    from kernelscale.kernels.native._arccos import safe_sqrt as sqrt  # noqa: PLC0415 - sqrt(max(x, 0)), zero derivative at 0

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


def kernel_fn(spec: KernelSpec, *, fast: bool = True, native: bool = True) -> KernelFn:
    """The analytic ``kernel_fn(x1, x2, get)`` of a spec.

    Built-in architectures (fc with relu/erf, convnet, myrtle) use kernelscale's own exact recursions
    (:mod:`kernelscale.kernels.native`: structured convolutions, exact diagonals, differentiable). ``native=False``
    builds neural-tangents' ``stax`` kernel instead (with :func:`fast_relu`, or with neural-tangents' own
    ``stax.Relu`` when ``fast=False``: the reference the tests and benchmarks compare against).
    """
    from kernelscale.kernels import native as native_kernels  # noqa: PLC0415

    if native and native_kernels.supports(spec):
        return native_kernels.kernel_fn(spec)
    return network(spec, fast=fast)[2]


def pairwise(spec_or_fn: KernelSpec | KernelFn, get: str | None = None) -> Callable[[Any, Any], Any]:
    """A jitted ``f(x1, x2) -> (n1, n2)`` kernel block for a spec (its kernel) or a kernel_fn + ``get``."""
    import jax  # noqa: PLC0415

    if isinstance(spec_or_fn, KernelSpec):
        fn, get = kernel_fn(spec_or_fn), spec_or_fn.kernel
    else:
        fn, get = spec_or_fn, get or "ntk"
    return jax.jit(lambda x1, x2: fn(x1, x2, get))


def gram_calls(spec: KernelSpec, dtype: str = "float32") -> tuple[Callable[[Any, Any], Any], Callable[[Any], Any] | None]:
    """The forward Gram engine's kernel calls for a spec: ``(f(x1, x2) -> (n1, n2), g(x) -> (n, n) or None)``.

    ``g`` is the symmetric call for diagonal blocks (each unordered pair once, exact diagonal); None when the
    spec has no native kernel. Convolutional kernels run compiled CPU code (:mod:`kernelscale.kernels.native`) on a
    CPU backend in float32, and the JAX recursion elsewhere (GPU, float64).
    """
    from kernelscale.kernels import native as native_kernels  # noqa: PLC0415

    if not native_kernels.supports(spec):
        return pairwise(spec), None
    return native_kernels.gram_block(spec, dtype), native_kernels.gram_symmetric(spec, dtype)


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
    """Estimated peak bytes per (x1, x2) pair in one kernel call (float32 intermediates, with headroom).

    Native convolutional kernels stream their pairs in steps of bounded size (``native.CHUNK_BYTES``), so a
    call needs only its outputs per pair; neural-tangents' keep ~16 arrays of the full spatial covariance.
    """
    from kernelscale.kernels import native as native_kernels  # noqa: PLC0415

    if native_kernels.supports(spec):
        return native_kernels.bytes_per_pair(spec, input_shape)
    live_arrays = 16  # nngp, ntk, cov1, cov2 and temporaries, measured to stay below this
    return 4 * live_arrays * spatial_pairs(spec, input_shape) + 64


def fixed_bytes(spec: KernelSpec, input_shape: tuple[int, ...]) -> int:
    """Working memory of one kernel call that does not grow with its number of pairs (native kernels' streamed
    steps and per-thread scratch); 0 for neural-tangents kernels, whose memory is all per pair."""
    from kernelscale.kernels import native as native_kernels  # noqa: PLC0415

    return native_kernels.fixed_bytes(spec, input_shape) if native_kernels.supports(spec) else 0


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
