"""Where stores live: local paths or fsspec URLs (``s3://``, ``gs://``, ...), opened as Zarr v3 groups.

Every store kernelscale writes goes through here, so object storage and local disk behave the same.
Credentials and endpoints come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...) through fsspec; they are never logged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync

from .errors import KernelscaleError, StoreError

log = logging.getLogger(__name__)

#: Codecs whose presence in stored metadata we refuse: they can execute code when decoded.
UNSAFE_CODECS = ("pickle", "object", "vlen-pickle")


#: errno values of a full disk or an exhausted quota.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an OSError for a full disk / quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def disk_full_error(path: str, what: str) -> KernelscaleError:
    """The one-line error for a full disk while ``what`` (e.g. 'writing tile (2, 7)') in store ``path``."""
    return KernelscaleError(
        f"no space left on the device holding {path} while {what}. Everything written before is kept and "
        "consistent (each chunk is written whole or not at all): free space (or move the store) and rerun the "
        "same command to resume"
    )


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _storage_options(path: str) -> dict[str, Any] | None:
    if not is_url(path):
        return None
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if str(path).startswith("s3://") and endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def exists(path: str) -> bool:
    """Whether a Zarr group (or anything) exists at ``path``."""
    if is_url(path):
        import fsspec  # noqa: PLC0415

        fs, p = fsspec.core.url_to_fs(path, **(_storage_options(path) or {}))
        return fs.exists(p.rstrip("/") + "/zarr.json")
    return os.path.exists(path)


def remove(path: str) -> None:
    """Delete a store (used by ``--overwrite``)."""
    if is_url(path):
        import fsspec  # noqa: PLC0415

        fs, p = fsspec.core.url_to_fs(path, **(_storage_options(path) or {}))
        if fs.exists(p):
            fs.rm(p, recursive=True)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def open_group(path: str, mode: str = "r") -> zarr.Group:
    """Open a Zarr v3 group; ``mode`` as in :func:`zarr.open_group`. Refuses unsafe codecs on read."""
    try:
        group = zarr.open_group(str(path), mode=mode, storage_options=_storage_options(str(path)), zarr_format=3)
    except FileNotFoundError as exc:
        raise StoreError(f"no Zarr store at {path}: check the path (create it with the matching kernelscale command)") from exc
    if mode in ("r", "r+", "a"):
        _refuse_unsafe(group, path)
    return group


def _refuse_unsafe(group: zarr.Group, path: str) -> None:
    """Refuse members whose raw metadata names a pickle/object codec or an object dtype.

    Reads each member's ``zarr.json`` as text (one directory listing + one read per member, recursing into
    subgroups) instead of letting zarr parse it: zarr fails on unknown codecs with its own errors, and a codec
    registered under another name (``numcodecs.pickle``) would parse and later unpickle chunk bytes.
    """
    from zarr.core.buffer import default_buffer_prototype  # noqa: PLC0415

    store = group.store_path.store

    async def _children(prefix: str) -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    todo = [group.store_path.path]
    while todo:
        prefix = todo.pop()
        for child in sync(_children(prefix)):
            key = f"{prefix}/{child}/zarr.json" if prefix else f"{child}/zarr.json"
            buf = sync(store.get(key, prototype=default_buffer_prototype()))
            if buf is None:
                continue
            try:
                meta = json.loads(buf.to_bytes().decode())
            except (ValueError, UnicodeDecodeError) as exc:
                raise StoreError(f"{path}/{child}: unreadable metadata ({exc}); re-create the store with kernelscale") from exc
            if meta.get("node_type") == "group":
                todo.append(key[: -len("/zarr.json")])
                continue
            names = [str(c.get("name", "")).lower() if isinstance(c, dict) else str(c).lower() for c in meta.get("codecs", [])]
            dtype = json.dumps(meta.get("data_type", "")).lower()
            bad = [n for n in names if n.rsplit(".", 1)[-1] in UNSAFE_CODECS]
            if bad or '"object"' in dtype or '"o"' in dtype or '"|o"' in dtype:
                raise StoreError(
                    f"{path}/{child} uses a {(bad or ['object dtype'])[0]!r} codec or an object dtype, which can run "
                    "code when read; kernelscale refuses it. Re-create the store with kernelscale."
                )


def checksummed_array(
    group: zarr.Group, name: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, fill_value: Any
) -> zarr.Array:
    """Create an array whose chunks carry a crc32c checksum (corruption raises on read)."""
    return group.create_array(
        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value, compressors=[Crc32cCodec()]
    )


def chunk_exists(array: zarr.Array, coords: Iterable[int]) -> bool:
    """Whether the chunk at chunk-grid ``coords`` has been written (never trust the fill value)."""
    key = array.metadata.encode_chunk_key(tuple(coords))
    return bool(sync(array.store_path.store.exists(f"{array.store_path.path}/{key}")))


def list_chunks(array: zarr.Array) -> set[tuple[int, ...]]:
    """Chunk-grid coordinates of every written chunk (one listing, no reads)."""
    prefix = f"{array.store_path.path}/c/"
    store = array.store_path.store

    async def _list() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    out = set()
    for key in sync(_list()):
        parts = key[len(prefix):].split("/")
        try:
            out.add(tuple(int(p) for p in parts))
        except ValueError:
            continue
    return out


def delete_chunk(array: zarr.Array, coords: Iterable[int]) -> None:
    key = array.metadata.encode_chunk_key(tuple(coords))
    sync(array.store_path.store.delete(f"{array.store_path.path}/{key}"))
