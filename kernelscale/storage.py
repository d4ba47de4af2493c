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
from typing import Any, Callable, Iterable

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from kernelscale._compat import zarr_chunk_prefix, zarr_get_bytes, zarr_sync
from kernelscale.errors import InputError, KernelscaleError, StoreError

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


def free_space(path: str) -> str:
    """Free space on the device holding local ``path`` (its nearest existing parent), e.g. '1.2 MiB'; '?' if unknown."""
    if is_url(path):
        return "?"
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "?"


def disk_full_error(path: str, what: str) -> KernelscaleError:
    """The one-line error for a full disk while ``what`` (e.g. 'writing tile (2, 7)') in store ``path``."""
    return KernelscaleError(
        f"no space left on the device holding {path} ({free_space(path)} free) while {what}. Everything written "
        "before is kept and consistent (each chunk is written whole or not at all): free space (or move the "
        "store) and rerun the same command to resume"
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


def store_kind(path: str) -> str | None:
    """What is at ``path``: a kernelscale store kind ('gram', 'dataset', 'model', 'distilled'), '' for a Zarr
    group without a kernelscale kind, or None for anything else (a plain folder or file, or nothing).

    Reads only the root ``zarr.json`` as text (no zarr parsing, nothing decoded).
    """
    text: str | None = None
    if is_url(path):
        import fsspec  # noqa: PLC0415

        fs, p = fsspec.core.url_to_fs(path, **(_storage_options(path) or {}))
        key = p.rstrip("/") + "/zarr.json"
        if fs.exists(key):
            text = fs.cat_file(key).decode(errors="replace")
    else:
        key = os.path.join(path, "zarr.json")  # a link at the root itself is followed (a store on another disk)
        if os.path.isdir(path) and os.path.isfile(key) and not os.path.islink(key):
            with open(key, encoding="utf-8", errors="replace") as f:
                text = f.read(1 << 20)
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    kind = (meta.get("attributes") or {}).get("kernelscale", "")
    return kind if isinstance(kind, str) else None


def check_replaceable(path: str, kind: str, flag: str = "--overwrite", deletes_root: bool = True) -> None:
    """Refuse to replace ``path`` unless it is a kernelscale store of ``kind`` (``--overwrite`` deletes only
    kernelscale's own stores, never a user's folder or file) without links leaving it. ``deletes_root``: the
    caller deletes the folder itself, so a link at ``path`` is refused too (a Gram is emptied in place instead)."""
    if not exists(path):
        return
    if deletes_root and not is_url(path) and os.path.islink(path):
        raise InputError(f"{path} is a symbolic link; {flag} replaces only a kernelscale {kind} store itself, "
                         "never a link's target: choose another path")
    found = store_kind(path)
    if found != kind:
        if found:
            what = f"a kernelscale {found} store"
        elif found == "":
            what = "a Zarr group that is not a kernelscale store"
        else:
            what = "not a kernelscale store (a folder or file of yours?)"
        raise InputError(f"{path} exists and is {what}; kernelscale replaces only its own {kind} stores (with "
                         f"{flag}): choose another path, or move it away yourself")
    check_symlinks(path)  # deleting or rewriting it must not reach files outside it


def remove_store(path: str, kind: str) -> None:
    """Delete the kernelscale store of ``kind`` at ``path`` (``--overwrite``); refuses anything else."""
    check_replaceable(path, kind)  # its kind, a link at its root, links inside it
    if exists(path):
        remove(path)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def check_disjoint(out: str, inputs: Iterable[tuple[str, str | None]], out_flag: str) -> None:
    """Refuse an output path equal to, inside or containing an input path (``inputs``: (flag, path) pairs).

    Local paths are compared after resolving symbolic links; URLs by their text.
    """
    def norm(p: str) -> str:
        return p.rstrip("/") if is_url(p) else _real(p)

    o = norm(out)
    for flag, path in inputs:
        if not path:
            continue
        i = norm(path)
        if o == i:
            raise InputError(f"{out_flag} {out} is the same path as {flag} {path}; choose another output path")
        if o.startswith(i.rstrip("/") + "/"):
            raise InputError(f"{out_flag} {out} lies inside {flag} {path}; choose an output path outside it")
        if i.startswith(o.rstrip("/") + "/"):
            raise InputError(f"{out_flag} {out} contains {flag} {path}; choose an output path that does not hold "
                             "an input")


def check_symlinks(path: str) -> None:
    """Refuse a local store holding a symbolic link (the store's root itself may be one).

    A link whose real path leaves the store would let reads, writes and deletes reach files outside it; one
    inside the store would alias two chunks (a tile read or written as another, checksums still valid).
    kernelscale never creates links in a store.
    """
    if is_url(path) or not os.path.isdir(path):
        return
    root = _real(path)
    todo = [os.path.abspath(path)]
    while todo:
        folder = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                where = "outside the store" if target != root and not target.startswith(root + os.sep) else "inside it"
                rel = os.path.relpath(entry.path, os.path.abspath(path))
                raise StoreError(f"{path}: member {rel!r} is a symbolic link to {target} ({where}); kernelscale "
                                 "never reads, writes or deletes through links in a store: replace the link by the "
                                 "real files or re-create the store")
            elif entry.is_dir(follow_symlinks=False):
                todo.append(entry.path)


def remove(path: str) -> None:
    """Delete a path (callers check first that it is our own store: :func:`remove_store`)."""
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
    """Open a Zarr v3 group; ``mode`` as in :func:`zarr.open_group` (``w-``: create, refuse an existing one).

    Before zarr parses anything of an existing store: symbolic links leaving the store are refused
    (:func:`check_symlinks`) and every array's raw metadata is checked against :func:`check_codecs` (only
    value-preserving codecs; pickle/object codecs and object dtypes are refused).
    """
    if mode in ("r", "r+", "a"):
        check_symlinks(path)
    try:
        group = zarr.open_group(str(path), mode=mode, storage_options=_storage_options(str(path)), zarr_format=3)
    except FileNotFoundError as exc:
        raise StoreError(f"no Zarr store at {path}: check the path (create it with the matching kernelscale command)") from exc
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError) as exc:
        if mode != "w-":
            raise
        raise StoreError(f"{path}: a store was created there meanwhile (by another run?); kernelscale creates "
                         "stores only where nothing is: choose another path, or rerun to resume it") from exc
    if mode in ("r", "r+", "a"):
        for name, meta in members(group, path).items():
            if meta.get("node_type") == "array":
                check_codecs(path, name, meta)
    return group


#: Codecs an array may use after ``bytes``: checksums and lossless compressors (nothing that changes values).
VALUE_PRESERVING_CODECS = ("crc32c", "zstd", "gzip", "blosc")
#: Data types of any array in a kernelscale store.
NUMERIC_DTYPES = ("float16", "float32", "float64", "uint8", "int32", "int64", "uint32")  # uint8/float16: compact dataset stores


#: Each store kind: how messages name it, and the command that creates one.
STORE_KINDS = {"dataset": ("dataset", "kernelscale ingest"), "gram": ("Gram", "kernelscale gram"),
               "model": ("model", "kernelscale solve"), "distilled": ("distilled", "kernelscale distill")}


def checked_attrs(path: str, group: zarr.Group, kind: str,
                  check_layout: Callable[[str, zarr.Group, dict[str, Any]], None]) -> dict[str, Any]:
    """``group``'s attributes, once it is a kernelscale store of ``kind`` (a key of STORE_KINDS) and
    ``check_layout(path, group, attrs)`` accepts it: from the raw metadata, before zarr parses any array."""
    attrs = dict(group.attrs)
    if attrs.get("kernelscale") != kind:
        name, command = STORE_KINDS[kind]
        raise StoreError(f"{path} is not a kernelscale {name} store (create one with `{command}`)")
    check_layout(str(path), group, attrs)
    return attrs


def members(group: zarr.Group, path: str) -> dict[str, dict[str, Any]]:
    """Raw metadata of every member below ``group`` (recursing into subgroups, not into arrays' chunks):
    relative name (``gram``, ``preprocess/mean``) -> parsed ``zarr.json``. One listing and one read per node;
    zarr does not parse anything here (an unknown codec must not fail with zarr's own errors)."""
    store = group.store_path.store
    base = group.store_path.path

    async def _children(prefix: str) -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    out: dict[str, dict[str, Any]] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        prefix = "/".join(p for p in (base, rel) if p)
        for child in zarr_sync(_children(prefix)):
            if child == "zarr.json":
                continue
            name = f"{rel}/{child}" if rel else child
            key = f"{prefix}/{child}/zarr.json" if prefix else f"{child}/zarr.json"
            raw = zarr_get_bytes(store, key)
            if raw is None:
                continue
            try:
                meta = json.loads(raw.decode())
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                raise StoreError(f"{path}: member {name!r} has unreadable metadata ({exc}); re-create the store "
                                 "with kernelscale") from exc
            out[name] = meta
            if meta.get("node_type") == "group":
                todo.append(name)
    return out


def check_codecs(path: str, name: str, meta: dict[str, Any]) -> None:
    """Refuse an array whose codecs could run code or change values, or whose dtype/grid is not plain.

    Allowed: ``bytes`` (little-endian) first, then only :data:`VALUE_PRESERVING_CODECS`; a regular chunk grid
    with the default ``/`` chunk keys; no storage transformers; a numeric data type.
    """
    fix = "re-create the store with kernelscale"
    codecs = meta.get("codecs")
    names = [str(c.get("name", "")).lower() if isinstance(c, dict) else str(c).lower() for c in codecs or []]
    dtype = meta.get("data_type")
    unsafe = [n for n in names if n.rsplit(".", 1)[-1] in UNSAFE_CODECS]
    if unsafe or not isinstance(dtype, str) or dtype.lower() in ("object", "o", "|o"):
        raise StoreError(f"{path}: array {name!r} uses a {(unsafe or ['object dtype'])[0]!r} codec or an object "
                         f"dtype, which can run code when read; kernelscale refuses it: {fix}")
    if not names or names[0] != "bytes" or (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
        raise StoreError(f"{path}: array {name!r} has codecs {names}; expected 'bytes' (little-endian) first, "
                         f"then only {', '.join(VALUE_PRESERVING_CODECS)}: {fix}")
    other = [n for n in names[1:] if n not in VALUE_PRESERVING_CODECS]
    if other:
        raise StoreError(f"{path}: array {name!r} has codec {other[0]!r}, which can change values; expected only "
                         f"bytes + {', '.join(VALUE_PRESERVING_CODECS)}: {fix}")
    if dtype not in NUMERIC_DTYPES:
        raise StoreError(f"{path}: array {name!r} has data type {dtype!r}; expected one of "
                         f"{', '.join(NUMERIC_DTYPES)}: {fix}")
    grid = meta.get("chunk_grid") or {}
    keys = meta.get("chunk_key_encoding") or {}
    shape, chunks = meta.get("shape"), (grid.get("configuration") or {}).get("chunk_shape")
    if (grid.get("name") != "regular" or keys.get("name") != "default"
            or (keys.get("configuration") or {}).get("separator", "/") != "/" or meta.get("storage_transformers")
            or not _int_list(shape, 0) or not _int_list(chunks, 1) or len(shape) != len(chunks)):
        raise StoreError(f"{path}: array {name!r} has an unexpected chunk layout (grid {grid.get('name')!r}, "
                         f"keys {keys}, shape {shape}, chunks {chunks}); expected a regular grid with '/' chunk "
                         f"keys: {fix}")


def _int_list(value: Any, low: int) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)


def check_array(path: str, name: str, meta: dict[str, Any] | None, *, dtype: str | tuple[str, ...],
                shape: tuple[int | None, ...] | int, chunks: tuple[int | None, ...] | None = None,
                fill: Any = None, checksum: bool = True, fix: str = "re-create the store with kernelscale") -> None:
    """Refuse array ``name`` unless it has this dtype, shape (an int: only the number of dimensions; None
    entries: any size), chunks (None: any), fill value ('NaN' or a number; None: any) and, with
    ``checksum``, a crc32c codec. The message names the store, the array, what was expected and ``fix``."""
    def refuse(what: str, expected: Any, found: Any) -> None:
        raise StoreError(f"{path}: array {name!r} has {what} {found}, expected {expected}: the store was altered "
                         f"or not written by this kernelscale; {fix}")

    if meta is None or meta.get("node_type") != "array":
        raise StoreError(f"{path}: array {name!r} is missing; {fix}")
    dtypes = (dtype,) if isinstance(dtype, str) else dtype
    if meta.get("data_type") not in dtypes:
        refuse("data type", " or ".join(dtypes), meta.get("data_type"))
    found = list(meta.get("shape") or [])
    if isinstance(shape, int):
        if len(found) != shape:
            refuse("shape", f"{shape} dimensions", tuple(found))
    elif len(found) != len(shape) or any(w is not None and w != f for w, f in zip(shape, found)):
        refuse("shape", tuple("any" if w is None else w for w in shape), tuple(found))
    got_chunks = list(((meta.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape") or [])
    if chunks is not None and (len(got_chunks) != len(chunks)
                               or any(w is not None and w != f for w, f in zip(chunks, got_chunks))):
        refuse("chunks", tuple("any" if w is None else w for w in chunks), tuple(got_chunks))
    if fill is not None:
        value = meta.get("fill_value")
        ok = value == "NaN" if fill == "NaN" else (not isinstance(value, str) and value == fill)
        if not ok:
            refuse("fill value", fill, value)
    if checksum and "crc32c" not in [str(c.get("name")) for c in meta.get("codecs", []) if isinstance(c, dict)]:
        refuse("codecs", "bytes + crc32c (every chunk checksummed)",
               [c.get("name") for c in meta.get("codecs", []) if isinstance(c, dict)])


def check_members(path: str, metas: dict[str, dict[str, Any]], allowed: Any, fix: str) -> None:
    """Refuse members (arrays or groups) whose name ``allowed(name, meta)`` rejects: nothing unexpected."""
    for name, meta in metas.items():
        if not allowed(name, meta):
            raise StoreError(f"{path}: unexpected {meta.get('node_type', 'member')} {name!r} in the store; {fix}")


def require(path: str, cond: bool, attr: str, expected: str, found: Any,
            fix: str = "re-create the store with kernelscale") -> None:
    """Refuse the store unless ``cond``: attribute ``attr`` should be ``expected``."""
    if not cond:
        shown = json.dumps(found) if not isinstance(found, str) else repr(found)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        raise StoreError(f"{path}: attribute {attr!r} is {shown}, expected {expected}: the store was altered or "
                         f"not written by this kernelscale; {fix}")


def is_int(value: Any, low: int = 0) -> bool:
    """A JSON integer (not a bool) >= ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


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
    return bool(zarr_sync(array.store_path.store.exists(f"{array.store_path.path}/{key}")))


def list_chunks(array: zarr.Array) -> set[tuple[int, ...]]:
    """Chunk-grid coordinates of every written chunk (one listing, no reads)."""
    prefix = zarr_chunk_prefix(array)
    store = array.store_path.store

    async def _list() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    out = set()
    for key in zarr_sync(_list()):
        parts = key[len(prefix):].split("/")
        try:
            out.add(tuple(int(p) for p in parts))
        except ValueError:
            continue
    return out


def delete_chunk(array: zarr.Array, coords: Iterable[int]) -> None:
    key = array.metadata.encode_chunk_key(tuple(coords))
    zarr_sync(array.store_path.store.delete(f"{array.store_path.path}/{key}"))
