"""The Gram job: everything a Gram worker needs to compute tiles of one store, as one typed, immutable record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GramJob:
    """One Gram run as its workers see it (pickled to every Ray actor).

    ``spec`` is the kernel spec's canonical JSON (the string the store's fingerprint binds); ``tile`` the tile
    side and ``sub_block`` the kernel-call side, in rows; ``input_shape`` one row's shape, e.g. (28, 28, 1).
    """

    out: str  #: Gram store path or URL
    data: str  #: dataset store of the rows
    against: str | None  #: dataset store of the columns (None: a symmetric Gram of ``data``)
    spec: str  #: canonical kernel spec JSON
    dtype: str  #: "float32" or "float64"
    tile: int  #: tile side (rows)
    sub_block: int  #: kernel-call side (rows): a tile is computed as calls of sub_block x sub_block pairs
    cache_blocks: int  #: row blocks (of ``tile`` rows) each worker keeps cached
    allow_code: bool  #: the kernel is user code the driver was allowed to import (workers re-check its hash)
    input_shape: tuple[int, ...]  #: shape of one row

    @property
    def spec_json(self) -> dict[str, Any]:
        """The kernel spec as a dict ``{"arch", "params", "kernel"}``."""
        return json.loads(self.spec)


def canonical_json(spec_json: dict[str, Any]) -> str:
    """A spec dict as canonical JSON: sorted keys, no spaces (as :meth:`KernelSpec.canonical`)."""
    return json.dumps(spec_json, sort_keys=True, separators=(",", ":"))
