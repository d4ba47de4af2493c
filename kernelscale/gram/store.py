"""Gram stores: a kernel matrix persisted tile by tile in a Zarr v3 group.

Layout::

    gram     (N, M) float32|float64, chunks (T, T): one chunk per tile, crc32c checksum, fill NaN
    attrs    kernelscale="gram", spec (kernel spec JSON), dtype, tile, symmetric, shape,
             data_fingerprint, against_fingerprint, versions, fingerprint

A symmetric store holds only the tiles on or above the diagonal (i <= j); reads of the lower triangle are
mirrored. A tile that was never written reads as NaN (the fill value) and every read path checks for it,
so a missing tile raises :class:`StoreError` instead of reading as numbers. A corrupt chunk fails its
crc32c check and raises too. The driver alone creates the store (metadata); workers open it ``r+`` and
write whole tiles, one writer per chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import numpy as np
import zarr

from kernelscale import storage
from kernelscale._compat import zarr_buffer, zarr_get_bytes, zarr_sync
from kernelscale.errors import StoreError
from kernelscale.gram.plan import TileGrid

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def gram_fingerprint(
    spec_json: str, dtype: str, data_fingerprint: str, against_fingerprint: str | None, versions: dict[str, str]
) -> str:
    """sha256 binding the dataset fingerprint(s), kernel spec, dtype and library versions."""
    payload = json.dumps(
        {"spec": json.loads(spec_json), "dtype": dtype, "data": data_fingerprint, "against": against_fingerprint,
         "versions": versions, "format": FORMAT_VERSION},
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


FIX = "recompute it with `kernelscale gram ... --overwrite` (or `kernelscale verify --repair` for bad tiles)"


def check_layout(path: str, group: zarr.Group, attrs: dict[str, Any]) -> None:
    """Refuse a Gram store whose attributes or arrays differ from the layout in the module docstring.

    Every attribute the readers use is type- and range-checked, the fingerprint is recomputed from the recorded
    spec, dtype, data fingerprints and versions, and ``gram`` must be (n, m) of that dtype in (tile, tile)
    chunks with NaN fill and crc32c. Only ``gram`` and the ``_lock`` group may exist.
    """
    req = storage.require
    req(path, attrs.get("format_version") == FORMAT_VERSION, "format_version", str(FORMAT_VERSION),
        attrs.get("format_version"), FIX)
    shape = attrs.get("shape")
    req(path, isinstance(shape, list) and len(shape) == 2 and all(storage.is_int(v, 1) for v in shape), "shape",
        "[N, M] with N, M >= 1", shape, FIX)
    req(path, storage.is_int(attrs.get("tile"), 1), "tile", "an integer >= 1", attrs.get("tile"), FIX)
    req(path, isinstance(attrs.get("symmetric"), bool) and (not attrs.get("symmetric") or shape[0] == shape[1]),
        "symmetric", "true (square store) or false", attrs.get("symmetric"), FIX)
    req(path, attrs.get("dtype") in ("float32", "float64"), "dtype", "float32 or float64", attrs.get("dtype"), FIX)
    spec = attrs.get("spec")
    req(path, isinstance(spec, dict) and isinstance(spec.get("arch"), str) and isinstance(spec.get("params", {}), dict)
        and spec.get("kernel", "ntk") in ("ntk", "nngp"), "spec", "a kernel spec {arch, params, kernel}", spec, FIX)
    for key, optional in (("fingerprint", False), ("data_fingerprint", False), ("against_fingerprint", True)):
        value = attrs.get(key)
        req(path, (optional and value is None) or (isinstance(value, str) and value.startswith("sha256:")), key,
            "a 'sha256:...' string" + (" or null" if optional else ""), value, FIX)
    req(path, isinstance(attrs.get("versions"), dict), "versions", "a {library: version} object",
        attrs.get("versions"), FIX)
    expected = gram_fingerprint(json.dumps(spec, sort_keys=True), attrs["dtype"], attrs["data_fingerprint"],
                                attrs.get("against_fingerprint"), attrs["versions"])
    req(path, attrs["fingerprint"] == expected, "fingerprint",
        f"{expected[:19]}... (the hash of its recorded spec, dtype, data and versions)", attrs["fingerprint"], FIX)
    metas = storage.members(group, path)
    storage.check_members(path, metas, lambda name, meta: name == "gram" or (name in (LOCK_GROUP, "_progress") and
                                                                             meta.get("node_type") == "group"), FIX)
    tile = attrs["tile"]
    storage.check_array(path, "gram", metas.get("gram"), dtype=attrs["dtype"], shape=tuple(shape),
                        chunks=(tile, tile), fill="NaN", fix=FIX)


class GramStore:
    """An opened Gram store. ``block``/``diag``/``to_numpy`` raise on missing or corrupt tiles."""

    def __init__(self, path: str, group: zarr.Group):
        attrs = storage.checked_attrs(path, group, "gram", check_layout)
        self.path = str(path)
        self.group = group
        self.attrs = attrs
        self.array: zarr.Array = group["gram"]
        n, m = self.array.shape
        self.grid = TileGrid(int(n), int(m), int(attrs["tile"]), bool(attrs["symmetric"]))

    # -- description ------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.grid.n, self.grid.m)

    @property
    def symmetric(self) -> bool:
        return self.grid.symmetric

    @property
    def tile(self) -> int:
        return self.grid.tile

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.attrs["dtype"])

    @property
    def fingerprint(self) -> str:
        return str(self.attrs["fingerprint"])

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.attrs["spec"])

    # -- tiles ------------------------------------------------------------------------------------------
    def done_tiles(self) -> set[tuple[int, int]]:
        """Tiles whose chunk exists (one store listing; does not validate contents)."""
        return {c for c in storage.list_chunks(self.array) if len(c) == 2 and self.grid.stored(*c)}

    def missing_tiles(self) -> list[tuple[int, int]]:
        done = self.done_tiles()
        return [t for t in self.grid if t not in done]

    def read_tile(self, i: int, j: int) -> np.ndarray:
        """The stored tile (i, j) (i <= j for symmetric stores); raises on missing/corrupt/non-finite."""
        r0, r1, c0, c1 = self.grid.bounds(i, j)
        try:
            values = np.asarray(self.array[r0:r1, c0:c1])
        except ValueError as exc:
            if "checksum" in str(exc).lower():
                raise StoreError(
                    f"{self.path}: tile ({i}, {j}) is corrupt ({exc}); run `kernelscale verify {self.path} --repair`"
                ) from exc
            raise
        if not np.isfinite(values).all():
            state = "missing" if np.isnan(values).all() else "non-finite"
            raise StoreError(
                f"{self.path}: tile ({i}, {j}) is {state}; finish the Gram by rerunning `kernelscale gram` "
                f"(it resumes) or run `kernelscale verify {self.path} --repair`"
            )
        return values

    def write_tile(self, i: int, j: int, values: np.ndarray) -> None:
        """Write one whole tile (idempotent). Refuses non-finite values: they would read as missing."""
        r0, r1, c0, c1 = self.grid.bounds(i, j)
        values = np.asarray(values, self.dtype)
        if values.shape != (r1 - r0, c1 - c0):
            raise ValueError(f"tile ({i}, {j}) must have shape {(r1 - r0, c1 - c0)}, got {values.shape}")
        if not np.isfinite(values).all():
            raise StoreError(f"tile ({i}, {j}) has non-finite kernel values; check the inputs for NaN/Inf rows")
        try:
            self.array[r0:r1, c0:c1] = values
        except OSError as exc:
            if storage.is_disk_full(exc):
                raise storage.disk_full_error(self.path, f"writing tile ({i}, {j})") from exc
            raise

    # -- dense reads --------------------------------------------------------------------------------------
    def block(self, rows: slice | tuple[int, int], cols: slice | tuple[int, int]) -> np.ndarray:
        """Dense K[rows, cols] (contiguous ranges) as numpy, mirrored from the upper triangle as needed."""
        r0, r1 = _range(rows, self.grid.n)
        c0, c1 = _range(cols, self.grid.m)
        out = np.empty((r1 - r0, c1 - c0), self.dtype)
        for i, j in self.grid.covering(r0, r1, c0, c1):
            tr0, tr1, tc0, tc1 = self.grid.bounds(i, j)
            a0, a1, b0, b1 = max(r0, tr0), min(r1, tr1), max(c0, tc0), min(c1, tc1)
            if a0 >= a1 or b0 >= b1:
                continue
            if self.grid.stored(i, j):
                tile = self.read_tile(i, j)
                part = tile[a0 - tr0 : a1 - tr0, b0 - tc0 : b1 - tc0]
            else:
                tile = self.read_tile(j, i)
                part = tile[b0 - tc0 : b1 - tc0, a0 - tr0 : a1 - tr0].T
            out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = part
        return out

    def diag(self) -> np.ndarray:
        """The diagonal (symmetric stores), read from the diagonal tiles only."""
        if not self.symmetric:
            raise StoreError(f"{self.path} is a rectangular cross Gram; it has no diagonal")
        parts = [np.diag(self.read_tile(i, i)) for i in range(self.grid.shape[0])]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def to_numpy(self) -> np.ndarray:
        """The whole matrix in memory (only for sizes that fit)."""
        return self.block((0, self.grid.n), (0, self.grid.m))


def _range(sel: slice | tuple[int, int], size: int) -> tuple[int, int]:
    if isinstance(sel, slice):
        start, stop, step = sel.indices(size)
        if step != 1:
            raise ValueError("block() takes contiguous ranges")
        return start, stop
    start, stop = sel
    if not 0 <= start <= stop <= size:
        raise ValueError(f"range {sel} out of bounds for size {size}")
    return int(start), int(stop)


def create_gram(path: str, *, n: int, m: int, tile: int, dtype: str, symmetric: bool, attrs: dict[str, Any],
                group: zarr.Group | None = None) -> GramStore:
    """Create an empty Gram store (driver only). ``attrs`` must hold ``spec`` and ``fingerprint``.

    Without ``group`` the store is created exclusively at ``path`` (refused when anything is there); with it,
    the array is created inside that (locked, empty) group and refused when one exists already.
    """
    if group is None:
        group = storage.open_group(path, "w-")
    try:
        storage.checksummed_array(group, "gram", (n, m), (tile, tile), dtype, np.nan)
    except zarr.errors.ContainsArrayError as exc:
        raise StoreError(f"{path}: another run created the Gram array meanwhile; rerun to resume it") from exc
    group.attrs.update(
        {"kernelscale": "gram", "format_version": FORMAT_VERSION, "tile": tile, "dtype": dtype,
         "symmetric": symmetric, "shape": [n, m]} | attrs
    )
    return GramStore(path, group)


def reset_gram(group: zarr.Group) -> None:
    """Empty a Gram store for ``--overwrite`` under its lock: delete the ``gram`` array (its tiles) and the
    attributes; the ``_lock`` group stays, so the driver keeps holding the store."""
    if "gram" in group:
        del group["gram"]
    group.attrs.put({})


def open_gram(path: str, mode: str = "r") -> GramStore:
    """Open a Gram store for reading (``mode='r'``) or for tile writes by workers (``'r+'``)."""
    if not storage.exists(path):
        raise StoreError(f"{path}: no Gram store there (create one with `kernelscale gram DATA.zarr --out {path}`)")
    return GramStore(path, storage.open_group(path, mode))


# ----------------------------------------------------------------------------------------------------------
# Driver lease: one driver per Gram store
# ----------------------------------------------------------------------------------------------------------

LOCK_GROUP = "_lock"  # a Zarr subgroup whose attributes hold the lock record
LEASE_SECONDS = 120.0  # a lock whose heartbeat is older than this is stale
HEARTBEAT_SECONDS = 15.0


def _pid_alive(pid: int) -> bool:
    import os  # noqa: PLC0415

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class GramLock:
    """A lease on a Gram store held by the driver computing it, stored as the attributes of subgroup ``_lock``.

    The lock records host, pid, a random token and a heartbeat time (refreshed every
    ``HEARTBEAT_SECONDS`` by a daemon thread). Another driver is refused while the holder is alive; a lock
    is stale (and taken over) when its pid is dead on this host or its heartbeat is older than
    ``lease_seconds``, so a crashed driver never blocks the rerun that resumes its work.
    """

    def __init__(self, store: GramStore | zarr.Group, lease_seconds: float = LEASE_SECONDS, path: str | None = None):
        group = store.group if isinstance(store, GramStore) else store
        self.group = group
        self.path = path or (store.path if isinstance(store, GramStore) else str(group.store))
        self._store = group.store
        self._dir = (group.path + "/" if group.path else "") + LOCK_GROUP
        self._key = self._dir + "/zarr.json"
        self.lease_seconds = lease_seconds
        self.token = ""
        self._stop = None
        self._thread = None

    # -- raw key access -----------------------------------------------------------------------------------
    def read(self) -> dict[str, Any] | None:
        """The current lock record, or None when unlocked (an unreadable record counts as stale)."""
        raw = zarr_get_bytes(self._store, self._key)
        if raw is None:
            return None
        try:
            return dict(json.loads(raw.decode())["attributes"]["lock"])
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return {"corrupt": True}

    def _write(self, record: dict[str, Any], exclusive: bool) -> None:
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {"lock": record}}
        buf = zarr_buffer(json.dumps(meta).encode())
        if exclusive:
            try:
                zarr_sync(self._store.set_if_not_exists(self._key, buf))
                return
            except NotImplementedError:  # some fsspec stores: check-then-set
                if self.read() is not None:
                    return
        zarr_sync(self._store.set(self._key, buf))

    def _delete(self) -> None:
        zarr_sync(self._store.delete(self._key))
        zarr_sync(self._store.delete_dir(self._dir))

    # -- lease logic --------------------------------------------------------------------------------------
    def stale_reason(self, record: dict[str, Any], now: float | None = None) -> str | None:
        """Why ``record`` no longer holds the store (None while its holder is alive)."""
        import socket  # noqa: PLC0415
        import time  # noqa: PLC0415

        if record.get("corrupt"):
            return "the lock record is unreadable"
        now = time.time() if now is None else now
        age = now - float(record.get("heartbeat", 0.0))
        if age > self.lease_seconds:
            return f"its heartbeat is {age:.0f} s old (lease {self.lease_seconds:.0f} s)"
        if record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1))):
            return f"process {record.get('pid')} on this host is dead"
        return None

    def acquire(self) -> "GramLock":
        """Take the lease or raise :class:`StoreError` naming the live holder."""
        import os  # noqa: PLC0415
        import secrets  # noqa: PLC0415
        import socket  # noqa: PLC0415
        import threading  # noqa: PLC0415
        import time  # noqa: PLC0415

        token = secrets.token_hex(8)
        for _ in range(3):
            held = self.read()
            if held is not None:
                reason = self.stale_reason(held)
                if reason is None:
                    raise StoreError(
                        f"{self.path} is being computed by another kernelscale driver (pid {held.get('pid')} on "
                        f"{held.get('host')}, started {held.get('started')}); wait for it to finish, or if it "
                        f"is gone, its lease expires {self.lease_seconds:.0f} s after its last heartbeat"
                    )
                log.warning("taking over a stale lock on %s: %s", self.path, reason)
                self._delete()
            now = time.time()
            record = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "heartbeat": now}
            self._write(record, exclusive=True)
            if (self.read() or {}).get("token") == token:
                self.token = token
                self._record = record
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._heartbeat, name="kernelscale-lock", daemon=True)
                self._thread.start()
                return self
        raise StoreError(f"{self.path}: could not take the driver lock (another driver raced for it); retry")

    def rewrite(self) -> None:
        """Write our record again (after the store was re-created by ``--overwrite``)."""
        if self.token:
            self._write(self._record, exclusive=False)

    def _heartbeat(self) -> None:
        import time  # noqa: PLC0415

        while self._stop is not None and not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                held = self.read()
                if held is None or held.get("token") != self.token:
                    log.warning("lost the driver lock on %s", self.path)
                    return
                self._record["heartbeat"] = time.time()
                self._write(self._record, exclusive=False)
            except Exception as exc:  # noqa: BLE001 - a failed heartbeat must not kill the run
                log.warning("lock heartbeat on %s failed: %s", self.path, exc)

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self.token:
            try:
                if (self.read() or {}).get("token") == self.token:
                    self._delete()
            except Exception as exc:  # noqa: BLE001
                log.warning("could not release the lock on %s: %s", self.path, exc)
        self.token = ""

    def __enter__(self) -> "GramLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
