"""Where stores live: local paths or fsspec URLs (``s3://``, ``gs://``, ...), opened as Zarr v3 groups.

Every store kernelscale writes goes through here, so object storage and local disk behave the same.
Credentials and endpoints come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...) through fsspec; they are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync

from .errors import StoreError

log = logging.getLogger(__name__)

#: Codecs whose presence in stored metadata we refuse: they can execute code when decoded.
UNSAFE_CODECS = ("pickle", "object", "vlen-pickle")


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
    for name, arr in group.arrays():
        meta = json.dumps(arr.metadata.to_dict(), default=str).lower()
        for bad in UNSAFE_CODECS:
            if f'"{bad}"' in meta or arr.dtype == np.dtype(object):
                raise StoreError(
                    f"{path}/{name} uses a {bad!r} codec or object dtype, which can run code when read; "
                    "kernelscale refuses it. Re-create the store with kernelscale."
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
