"""Live progress of a running Gram computation, for ``kernelscale status`` while the driver works.

The driver writes a small record (tiles and entries done in this run, start and update times) as the
attributes of the store's ``_progress`` subgroup, at most every ``INTERVAL_SECONDS``; ``gram_status`` turns it
into the live rate and ETA. The record is a single small key written whole, so a reader sees the old or
the new record, never a mix.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import zarr

from kernelscale._compat import zarr_buffer, zarr_get_bytes, zarr_sync

PROGRESS_GROUP = "_progress"
INTERVAL_SECONDS = 2.0


def _key(group: zarr.Group) -> str:
    return (group.path + "/" if group.path else "") + PROGRESS_GROUP + "/zarr.json"


def read_progress(group: zarr.Group) -> dict[str, Any] | None:
    """The last progress record of the store's driver, or None (never written, or unreadable)."""
    raw = zarr_get_bytes(group.store, _key(group))
    if raw is None:
        return None
    try:
        record = json.loads(raw.decode())["attributes"]["progress"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def live_rate(record: dict[str, Any] | None) -> dict[str, float] | None:
    """``{"entries_per_s", "tiles_per_s"}`` measured by a running driver, or None before its first tile."""
    if not record or not record.get("tiles_done"):
        return None
    elapsed = float(record.get("updated", 0)) - float(record.get("started", 0))
    if elapsed <= 0:
        return None
    return {"entries_per_s": float(record["entries_done"]) / elapsed, "tiles_per_s": float(record["tiles_done"]) / elapsed}


class ProgressWriter:
    """Writes the driver's progress record into a Gram store (throttled; write errors only skip an update)."""

    def __init__(self, group: zarr.Group, tiles_planned: int):
        self.group = group
        self.record: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                       "updated": time.time(), "tiles_planned": int(tiles_planned),
                                       "tiles_done": 0, "entries_done": 0}
        self.last_write = 0.0
        self._write()

    def tile_done(self, entries: int) -> None:
        """Count one finished tile; write the record if the last write is older than INTERVAL_SECONDS."""
        self.record["tiles_done"] += 1
        self.record["entries_done"] += int(entries)
        self.record["updated"] = time.time()
        if time.monotonic() - self.last_write >= INTERVAL_SECONDS:
            self._write()

    def close(self) -> None:
        """Write the final counts."""
        self._write()

    def _write(self) -> None:
        meta = {"zarr_format": 3, "node_type": "group", "attributes": {"progress": self.record}}
        try:
            zarr_sync(self.group.store.set(_key(self.group), zarr_buffer(json.dumps(meta).encode())))
        except OSError:  # a full disk or a flaky object store must not stop the computation for a status line
            return
        self.last_write = time.monotonic()
