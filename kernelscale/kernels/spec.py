"""Kernel specifications: :class:`KernelSpec`, ``--arch`` parsing, canonical JSON and user code.

A kernel is named by a :class:`KernelSpec` (architecture name, parameters, ``ntk``/``nngp``), written on the
command line as ``--arch NAME[:key=value,...] --kernel ntk|nngp`` and canonicalised to JSON, which enters
every fingerprint. ``--arch module:function`` (with ``--allow-code``) names user code by its source hash.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from kernelscale.errors import InputError

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
        """The jitted ``f(x1, x2) -> (n1, n2)`` of this spec's kernel (:func:`~kernelscale.kernels.blocks.pairwise`)."""
        from kernelscale.kernels.blocks import pairwise  # noqa: PLC0415  (blocks imports this module)

        return pairwise(self)

    def bytes_per_pair(self, input_shape: tuple[int, ...]) -> int:
        """Peak bytes per pair of one kernel call: known for built-in kernels (:func:`~kernelscale.kernels.blocks.
        bytes_per_pair`), measured from the traced program for user code (:func:`~kernelscale.kernels.source.
        traced_bytes_per_pair`)."""
        from kernelscale.kernels.blocks import bytes_per_pair  # noqa: PLC0415  (blocks imports this module)
        from kernelscale.kernels.source import traced_bytes_per_pair  # noqa: PLC0415  (source imports this module)

        if self.arch == "code":
            return traced_bytes_per_pair(self.block_fn(), input_shape)
        return bytes_per_pair(self, input_shape)

    def fixed_bytes(self, input_shape: tuple[int, ...]) -> int:
        """Working bytes of one kernel call that do not grow with its pairs (:func:`~kernelscale.kernels.blocks.
        fixed_bytes`)."""
        from kernelscale.kernels.blocks import fixed_bytes  # noqa: PLC0415  (blocks imports this module)

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
