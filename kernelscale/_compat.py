"""Every use of a dependency's internals, each behind one small function.

kernelscale reaches past the public API of two libraries, each for a reason given at the function. When an
upgrade removes one of these internals, :func:`missing_internals` names it (``tests/test_compat.py`` fails with
that message) instead of a store read or a Ray start failing deep inside a run.

- Zarr 3: ``zarr.core.sync.sync`` (run zarr's async store calls from synchronous code),
  ``zarr.core.buffer.default_buffer_prototype`` (raw bytes in and out of a store), and the default v3 chunk
  key layout ``<array>/c/<i>/<j>`` (list a Gram's written tiles in one listing).
- Ray: ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` (a loopback-only local cluster), the logger name
  of Ray's token-authentication notice, ``ray._private.services.resolve_ip_for_localhost`` (a ``ray start``
  worker node that keeps a loopback ``--address``), ``ray._private.parameter.get_ray_client_dependency_error``
  (whether ``ray start --head`` opens a Ray Client server) and ``ray.scripts.scripts.main`` (``ray start``
  through this Python).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Awaitable, Iterator, TypeVar

T = TypeVar("T")

#: Zarr v3's default chunk key prefix inside an array: chunk (i, j) is ``<array path>/c/i/j``.
ZARR_CHUNK_PREFIX = "c/"
#: The logger Ray logs "Token authentication is enabled for this Ray cluster" with.
RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
#: ``ray`` run through this interpreter (a venv that imports ray from another environment has no ``ray`` script).
_RAY_CLI = "from ray.scripts.scripts import main; sys.argv = ['ray', *sys.argv[1:]]; main()"


def zarr_sync(awaitable: Awaitable[T]) -> T:
    """Run one of zarr's async store calls to completion on zarr's own event loop (``zarr.core.sync.sync``)."""
    from zarr.core.sync import sync  # noqa: PLC0415 - zarr internals load only where a store is touched

    return sync(awaitable)


def zarr_get_bytes(store: Any, key: str) -> bytes | None:
    """The raw bytes of ``key`` in a zarr store, or None when absent (no zarr parsing, nothing decoded)."""
    from zarr.core.buffer import default_buffer_prototype  # noqa: PLC0415 - zarr internals, loaded on use

    buf = zarr_sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def zarr_buffer(data: bytes) -> Any:
    """``data`` as a zarr buffer, to write raw bytes with ``store.set``/``set_if_not_exists``."""
    from zarr.core.buffer import default_buffer_prototype  # noqa: PLC0415 - zarr internals, loaded on use

    return default_buffer_prototype().buffer.from_bytes(data)


def zarr_chunk_prefix(array: Any) -> str:
    """The store key prefix under which ``array``'s chunks live (v3 default chunk keys: ``<path>/c/``)."""
    return f"{array.store_path.path}/{ZARR_CHUNK_PREFIX}"


@contextlib.contextmanager
def ray_single_machine_mode() -> Iterator[None]:
    """Ray's "single-machine" mode inside the block: ``ray.init`` then keeps a node IP of 127.0.0.1 instead of
    rewriting it to the machine's routable address (``ray_constants.ENABLE_RAY_CLUSTER = False``)."""
    from ray._private import ray_constants  # noqa: PLC0415 - Ray loads only where a cluster starts

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def ray_cli(keep_loopback: bool = False) -> list[str]:
    """The argv prefix of ``ray ...`` through this Python. ``keep_loopback``: ``ray start --address 127.0.0.1:P``
    then keeps the loopback address (Ray resolves it to the machine's routable IP), so a worker node joins a
    loopback head."""
    patch = "import ray._private.services as s; s.resolve_ip_for_localhost = lambda h: h; " if keep_loopback else ""
    return [sys.executable, "-c", "import sys; " + patch + _RAY_CLI]


def ray_has_client_server() -> bool:
    """Whether ``ray start --head`` opens a Ray Client server (ray[client] installed; the minimal ray refuses
    ``--ray-client-server-port``)."""
    from ray._private.parameter import get_ray_client_dependency_error  # noqa: PLC0415 - Ray loads only here

    return get_ray_client_dependency_error() is None


def missing_internals() -> list[str]:
    """The internals above that the installed zarr and Ray no longer have, each as one sentence (empty: all there)."""
    import importlib  # noqa: PLC0415
    from importlib.metadata import version  # noqa: PLC0415

    problems = []
    checks = [("zarr", "zarr.core.sync", "sync"), ("zarr", "zarr.core.buffer", "default_buffer_prototype"),
              ("ray", "ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
              ("ray", RAY_TOKEN_LOGGER, "logger"), ("ray", "ray._private.services", "resolve_ip_for_localhost"),
              ("ray", "ray._private.parameter", "get_ray_client_dependency_error"), ("ray", "ray.scripts.scripts", "main")]
    for package, module, name in checks:
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError:
            found = False
        if not found:
            problems.append(f"{package} {version(package)} has no {module}.{name}, which kernelscale._compat uses; "
                            "update the shim in kernelscale/_compat.py for this version")
    import zarr  # noqa: PLC0415

    encoding = zarr.create_array(store={}, shape=(2, 2), chunks=(1, 1), dtype="float32").metadata.chunk_key_encoding
    key = encoding.encode_chunk_key((1, 0))
    if key != ZARR_CHUNK_PREFIX + "1/0":
        problems.append(f"zarr {version('zarr')} names chunk (1, 0) {key!r}, not {ZARR_CHUNK_PREFIX + '1/0'!r} as "
                        "kernelscale._compat.ZARR_CHUNK_PREFIX assumes; update the shim for this version")
    return problems
