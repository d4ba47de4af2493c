"""Gram matrices at scale: the tile plan, the fingerprinted Zarr store and its lock, the Ray engine that fills it,
live progress, and the store-backed operators the solvers read.

Modules: ``plan`` (tile geometry: which tiles, in what order, how a tile splits into kernel calls), ``store``
(``GramStore``, ``GramLock``), ``job`` (the ``GramJob`` actors receive), ``worker`` (the ``GramWorker`` actor),
``engine`` (``compute_gram``), ``config`` (``GramConfig``), ``progress``, ``operators``.
"""

from kernelscale.gram.engine import compute_gram
from kernelscale.gram.store import GramStore, open_gram

__all__ = ["GramStore", "compute_gram", "open_gram"]
