"""The Gram worker: a Ray actor that computes tiles of one Gram store (see :mod:`kernelscale.gram.engine`).

Workers build the jitted kernel once, read their row blocks from the dataset store themselves (an LRU cache
of blocks, padded to the kernel-call size so every call has one shape and XLA compiles once), compute a tile
as a grid of ``s x s`` kernel calls that fit the memory budget (only the upper half of diagonal tiles,
mirrored exactly), and write the tile into the store. Tiles never pass through the driver.
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from kernelscale import kernels
from kernelscale.data import open_dataset
from kernelscale.gram.job import GramJob
from kernelscale.gram.plan import bands, sub_blocks
from kernelscale.gram.store import GramStore, open_gram


class GramWorker:
    """Computes tiles of one Gram store. One per worker slot; holds the jitted kernel and a row-block cache.

    I/O overlaps compute on one background thread: the column block of the likely next tile (same row band,
    next column) is read while this tile is computed, and a finished tile is written while the next one is
    computed. At most one write is pending; :meth:`flush` waits for it. A write lost with a killed actor is
    found by the driver's end-of-run listing and recomputed.
    """

    def __init__(self, job: GramJob, kernel_callable: Any = None):
        self.job = job
        self.kernel_callable = kernel_callable
        self.store: GramStore | None = None
        self.fn: Callable | None = None
        self.cache: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self.s = job.sub_block
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gram-io")
        self.pending_write: Future | None = None
        self.prefetched: dict[tuple[str, int], Future] = {}
        self.write_seconds = 0.0  # background write time not yet reported
        self.kernel_blob: bytes | None = None
        self.sym_fn: Callable | None = None  # x -> K(x, x), each unordered pair once (native kernels)

    def load_kernel(self, blob: bytes | None) -> None:
        """Use the driver's serialised kernel (see :func:`kernels.export_block_kernel`) instead of tracing."""
        self.kernel_blob = blob

    def _setup(self) -> None:
        import jax  # noqa: PLC0415

        job = self.job
        if job.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        self.store = open_gram(job.out, "r+")
        self.data = {"rows": open_dataset(job.data)}
        self.data["cols"] = open_dataset(job.against) if job.against else self.data["rows"]
        native = native_spec(job.spec_json, self.kernel_callable)
        if native is not None:  # kernelscale's own kernels: block calls and symmetric diagonal calls
            self.fn, self.sym_fn = kernels.gram_calls(native, job.dtype)
        elif self.kernel_blob is not None:  # a compiled program: no user code is imported here
            self.fn = kernels.load_block_kernel(self.kernel_blob)
        else:
            if job.allow_code:  # the driver was given --allow-code: re-check the source hash here too
                kernels.load_spec(job.spec_json, allow_code=True, where=job.out)
            self.fn = block_kernel(job.spec_json, self.kernel_callable)

    def _key(self, which: str, index: int) -> tuple[str, int]:
        return ("rows" if which == "rows" or not self.job.against else "cols", index)

    def _read(self, which: str, index: int) -> np.ndarray:
        """Rows of tile band ``index`` of the row (``rows``) or column (``cols``) data, padded to a multiple of
        the kernel-call size by repeating the last row (padding never produces NaN)."""
        data = self.data[which]
        t = self.job.tile
        x = data.rows(index * t, min(data.n, (index + 1) * t))
        pad = -len(x) % self.s
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        return x

    def _block(self, which: str, index: int) -> list[Any]:
        """Band ``index`` as device arrays of ``s`` rows each, from the cache, a finished prefetch, or read now."""
        import jax.numpy as jnp  # noqa: PLC0415

        key = self._key(which, index)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        future = self.prefetched.pop(key, None)
        x = future.result() if future is not None else self._read(which, index)
        # one device array per kernel call's rows: no slicing op per call
        value = [jnp.asarray(x[a : a + self.s], dtype=self.job.dtype) for a in range(0, len(x), self.s)]
        self.cache[key] = value
        while len(self.cache) > self.job.cache_blocks:
            self.cache.popitem(last=False)
        return value

    def _prefetch(self, which: str, index: int) -> None:
        key = self._key(which, index)
        if 0 <= index < bands(self.data[which].n, self.job.tile) and key not in self.cache and key not in self.prefetched:
            self.prefetched = {key: self.io.submit(self._read, which, index)}  # only the latest guess is kept

    def _write(self, i: int, j: int, values: np.ndarray) -> float:
        assert self.store is not None
        t = time.perf_counter()
        self.store.write_tile(i, j, values)
        return time.perf_counter() - t

    def _wait_write(self) -> None:
        """Wait for the pending write; re-raises its error (disk full, non-finite values) here."""
        if self.pending_write is not None:
            future, self.pending_write = self.pending_write, None
            self.write_seconds += future.result()

    def compute(self, i: int, j: int) -> dict[str, Any]:
        """Compute tile (i, j) and hand it to the background writer; returns a small status record."""
        import ray  # noqa: PLC0415

        t0 = time.perf_counter()
        if self.fn is None:
            self._setup()
        assert self.store is not None and self.fn is not None
        grid, s = self.store.grid, self.s
        r0, r1, c0, c1 = grid.bounds(i, j)
        nr, nc = r1 - r0, c1 - c0
        diagonal = grid.symmetric and i == j
        x1 = self._block("rows", i)
        x2 = x1 if diagonal else self._block("cols", j)
        # guess the next tile: the plan walks a row band left to right, then (symmetric) starts band i + 1
        if j + 1 < bands(self.data["cols"].n, self.job.tile):
            self._prefetch("cols", j + 1)
        elif grid.symmetric:
            self._prefetch("rows", i + 1)
        t_read = time.perf_counter()
        out = np.empty((nr, nc), self.job.dtype)
        for a, b in sub_blocks(nr, nc, s, diagonal):
            ra, rb = min(s, nr - a), min(s, nc - b)
            if diagonal and a == b and self.sym_fn is not None:
                k = np.asarray(self.sym_fn(x1[a // s][:ra]))  # exactly symmetric, exact diagonal
            else:
                k = np.asarray(self.fn(x1[a // s], x2[b // s]))
            if diagonal and a == b:
                k = np.triu(k) + np.triu(k, 1).T  # exactly symmetric
            out[a : a + ra, b : b + rb] = k[:ra, :rb]
            if diagonal and a != b:
                out[b : b + rb, a : a + ra] = k[:ra, :rb].T
        t_kernel = time.perf_counter()
        self._wait_write()
        self.pending_write = self.io.submit(self._write, i, j, out)
        t_write = time.perf_counter()
        written, self.write_seconds = self.write_seconds, 0.0
        return {"tile": (i, j), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "entries": nr * nc, "read_s": t_read - t0, "kernel_s": t_kernel - t_read,
                "write_s": written, "stall_s": t_write - t_kernel}

    def flush(self) -> dict[str, Any]:
        """Wait for the pending write; returns the write time not yet reported."""
        self._wait_write()
        written, self.write_seconds = self.write_seconds, 0.0
        return {"write_s": written}

    def ping(self) -> str:
        return socket.gethostname()


def block_kernel(spec_json: dict[str, Any], kernel_callable: Any) -> Callable[[Any, Any], Any]:
    """The jitted ``f(x1, x2)`` of a run: the spec's kernel, or the user's ``kernel_fn`` with the spec's ``get``."""
    if kernel_callable is not None:
        return kernels.pairwise(kernel_callable, spec_json["kernel"])
    return kernels.pairwise(kernels.KernelSpec.from_json(spec_json))


def native_spec(spec_json: dict[str, Any], kernel_callable: Any) -> kernels.KernelSpec | None:
    """The run's spec when kernelscale has its own kernel for it (:mod:`kernelscale.kernels.native`), else None."""
    from kernelscale.kernels import native  # noqa: PLC0415  (defers jax and numba)

    if kernel_callable is not None or spec_json.get("arch") in ("callable", "code"):
        return None
    spec = kernels.KernelSpec.from_json(spec_json)
    return spec if native.supports(spec) else None


def export_kernel(job: GramJob, kernel_callable: Any) -> bytes | None:
    """The block kernel of this run serialised for the actors, or None (float64, native kernels, which
    actors build themselves in well under a second, or not exportable)."""
    if job.dtype != "float32" or native_spec(job.spec_json, kernel_callable) is not None:
        return None  # tracing float64 would need jax_enable_x64 in the driver process
    return kernels.export_block_kernel(block_kernel(job.spec_json, kernel_callable), job.sub_block,
                                       job.input_shape, job.dtype)
