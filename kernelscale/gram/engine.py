"""The distributed Gram engine: Ray actors compute kernel tiles and write them straight into a Gram store.

Flow (driver):
1. check inputs and the memory budget, open the dataset store(s), compute the fingerprint;
2. create the Gram store (metadata only) or, if it exists, refuse a different fingerprint before any
   compute (``overwrite`` replaces it);
3. take the driver lock (:class:`~kernelscale.gram.store.GramLock`), list the tiles already present
   (one store listing) and plan the rest (:class:`~kernelscale.gram.plan.TilePlan`);
4. describe the run as one :class:`~kernelscale.gram.job.GramJob`, start one actor per worker slot and feed
   them tiles with ``ray.wait`` (two in flight per actor);
5. record the run's timing in the store's attributes and return a small summary.

Workers (:class:`~kernelscale.gram.worker.GramWorker`) build the jitted kernel once, read their row blocks
from the dataset store themselves, compute a tile as a grid of ``s x s`` kernel calls that fit the memory
budget (the kernel's bytes per pair: :class:`~kernelscale.kernels.source.KernelSource`), and write the tile
into the store. Tiles never pass through the driver. Writes are whole chunks, atomic and idempotent, so a
killed actor (restarted by Ray, its task retried) or a killed driver (rerun: only missing tiles are computed)
never leaves a wrong matrix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any, Callable, Iterable

import numpy as np

from kernelscale import kernels, runtime, storage
from kernelscale.data import DatasetStore, open_dataset
from kernelscale.errors import InputError, KernelscaleError, StoreError
from kernelscale.gram.job import GramJob, canonical_json
from kernelscale.gram.plan import MAX_TILE, MIN_TILE, default_sub_block  # noqa: F401 - re-exported (callers, tests)
from kernelscale.gram.plan import TileGrid, TilePlan, check_tile, default_tile, sub_block_size, tile_entries
from kernelscale.gram.progress import ProgressWriter, live_rate, read_progress
from kernelscale.gram.store import LOCK_GROUP, GramLock, GramStore, create_gram, gram_fingerprint, open_gram, reset_gram
from kernelscale.gram.worker import GramWorker, block_kernel, export_kernel

log = logging.getLogger(__name__)

DTYPES = ("float32", "float64")
IN_FLIGHT_PER_WORKER = 2
BUDGET_FRACTION = 0.4  # default memory budget: this fraction of available RAM, shared by the node's workers
RUNS_KEPT = 20  # per-run timing records kept in the store's attributes
QUIESCE_SECONDS = 30.0  # wait at most this long for actors' pending writes when a run stops
MISSING_ROUNDS = 3  # recompute rounds for tiles lost in a dead actor's pending write


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def available_memory() -> int:
    """Available RAM of this machine in bytes."""
    try:
        import psutil  # noqa: PLC0415

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with ray
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def actors_per_node(workers: int | None, gpus_per_worker: float, tiles: int) -> int:
    """How many Gram actors share this machine's RAM: ``--workers`` (default one per CPU), at most one per CPU
    and one per tile. With ``--gpus-per-worker`` the default is one (kernel calls then live in GPU memory)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    default = 1 if gpus_per_worker > 0 else cpus
    return max(1, min(workers or default, cpus, tiles))


def default_memory_budget(actors: int) -> int:
    """Bytes per actor for one kernel call: BUDGET_FRACTION (40%) of available RAM shared by ``actors``."""
    return int(BUDGET_FRACTION * available_memory() / max(1, actors))


def _claim_store(out: str, overwrite: bool) -> GramLock:
    """The driver lock of the Gram store at ``out``, taken before anything is created in it.

    Refuses a path that holds anything but a kernelscale Gram store or the empty group an interrupted first run
    left; creates that empty root group when nothing is there, then takes the lock (an exclusive create of its
    key), so of two concurrent first runs one gets the store and the other a clear refusal. The caller re-checks
    the store's attributes under the lock (``lock.group``) and creates or validates the Gram there.
    """
    if storage.exists(out) and storage.store_kind(out) != "":
        storage.check_replaceable(out, "gram", deletes_root=False)  # emptied in place by --overwrite
    group = storage.open_group(out, "a")
    if dict(group.attrs).get("kernelscale") is None:
        extra = [name for name in storage.members(group, out) if name.split("/")[0] not in (LOCK_GROUP, "_progress")]
        if extra:
            raise StoreError(f"{out} is a Zarr group that is not a kernelscale store (it holds {extra[0]!r}); "
                             "kernelscale replaces only its own stores: choose another --out")
    return GramLock(group, path=out).acquire()


def _kernel_source(spec_or_kernel_fn: Any, kernel_id: str | None, get: str) -> kernels.KernelSource:
    """The run's kernel: a KernelSpec (checked like one read from a store) or a user kernel_fn callable."""
    if isinstance(spec_or_kernel_fn, kernels.KernelSpec):
        if spec_or_kernel_fn.arch == "code" and not kernels.code_allowed(spec_or_kernel_fn):
            kernels.load_spec(spec_or_kernel_fn.to_json(), where="compute_gram's spec")  # raises: needs allow_code
        return spec_or_kernel_fn
    if isinstance(spec_or_kernel_fn, (str, dict)):
        return kernels.load_spec(spec_or_kernel_fn, where="compute_gram's spec")
    if callable(spec_or_kernel_fn):
        return kernels.CallableKernel(spec_or_kernel_fn, str(kernel_id) if kernel_id else "", get)
    raise InputError(f"expected a KernelSpec (kernelscale.parse_arch) or a kernel_fn(x1, x2, get) callable, got {type(spec_or_kernel_fn).__name__}")


def _open_data(data: str | DatasetStore, what: str) -> DatasetStore:
    store = data if isinstance(data, DatasetStore) else open_dataset(str(data))
    if store.n == 0:
        raise InputError(f"{what} {store.path} has no rows")
    store.check_rows()  # NaN/Inf or corrupt rows are refused before any compute
    store.check_content()  # rows edited behind the fingerprint's back are refused too (sampled chunks)
    return store


def _describe_mismatch(attrs: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Human-readable differences between an existing store's attributes and this run's."""
    diffs = []
    if attrs.get("data_fingerprint") != want["data_fingerprint"]:
        diffs.append(f"data (store built from {attrs.get('data_fingerprint', '?')[:19]}..., "
                     f"this dataset is {want['data_fingerprint'][:19]}...)")
    if attrs.get("against_fingerprint") != want["against_fingerprint"]:
        diffs.append(f"against data ({attrs.get('against_fingerprint')} vs {want['against_fingerprint']})")
    if json.dumps(attrs.get("spec"), sort_keys=True) != json.dumps(want["spec"], sort_keys=True):
        diffs.append(f"kernel spec (store: {json.dumps(attrs.get('spec'), sort_keys=True)}, "
                     f"requested: {json.dumps(want['spec'], sort_keys=True)})")
    if attrs.get("dtype") != want["dtype"]:
        diffs.append(f"dtype (store {attrs.get('dtype')}, requested {want['dtype']})")
    if attrs.get("versions") != want["versions"]:
        diffs.append(f"library versions (store {attrs.get('versions')}, now {want['versions']})")
    if int(attrs.get("tile", -1)) != want["tile"]:
        diffs.append(f"tile (store {attrs.get('tile')}, requested {want['tile']}; pass --tile {attrs.get('tile')})")
    if list(attrs.get("shape", [])) != list(want["shape"]):
        diffs.append(f"shape (store {attrs.get('shape')}, requested {want['shape']})")
    return diffs


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def _disk_full_is_clear(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Turn a full disk met by the driver itself (lock, metadata, run record) into the one-line error."""
    import functools  # noqa: PLC0415

    @functools.wraps(fn)
    def wrapper(data: Any, spec_or_kernel_fn: Any, out: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return fn(data, spec_or_kernel_fn, out, *args, **kwargs)
        except OSError as exc:
            if storage.is_disk_full(exc):
                raise storage.disk_full_error(out, "computing the Gram") from exc
            raise

    return wrapper


@_disk_full_is_clear
def compute_gram(
    data: str | DatasetStore,
    spec_or_kernel_fn: Any,
    out: str,
    *,
    against: str | DatasetStore | None = None,
    tile: int | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    dtype: str = "float32",
    memory_budget: int | None = None,
    overwrite: bool = False,
    address: str | None = None,
    progress: bool = True,
    kernel_id: str | None = None,
    get: str = "ntk",
    tiles: Iterable[tuple[int, int]] | None = None,
    max_tiles: int | None = None,
    sub_block: int | None = None,
    cache_blocks: int = 4,
) -> dict[str, Any]:
    """Compute (or resume) the Gram K(data, data) -- or K(data, against) -- into the Gram store ``out``.

    ``spec_or_kernel_fn``: a :class:`~kernelscale.kernels.KernelSpec` (``parse_arch``) or any
    ``kernel_fn(x1, x2, get)`` callable with ``kernel_id`` naming it (and ``get`` = 'ntk'|'nngp').
    ``memory_budget``: bytes per worker for one kernel call's intermediates (default: 40% of available RAM
    divided among the workers). ``tiles``: compute only these (i, j) tiles (recomputed even if present);
    ``max_tiles``: stop after this many pending tiles (sampling a huge Gram). Returns the JSON summary:
    ``tiles_total``, ``tiles_computed``, ``tiles_skipped``, ``seconds``, ``entries_per_s``, ``nodes``, ...
    """
    t_start = time.perf_counter()
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = _kernel_source(spec_or_kernel_fn, kernel_id, get)
    spec_json = source.to_json()
    kernel_callable = source.fn if isinstance(source, kernels.CallableKernel) else None
    rows = _open_data(data, "DATA")
    cols = _open_data(against, "--against") if against is not None else None
    if cols is not None and cols.input_shape != rows.input_shape:
        raise InputError(f"--against rows have shape {cols.input_shape} but DATA rows have {rows.input_shape}; "
                         "both must be ingested with the same --resize")
    symmetric = cols is None
    n, m = rows.n, (cols.n if cols is not None else rows.n)
    if tile is None:
        resume = not overwrite and storage.exists(out) and storage.store_kind(out) == "gram"
        tile = int(open_gram(out).tile) if resume else default_tile(n, m, symmetric)
    check_tile(tile, n, m, dtype, available_memory())
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if max_tiles is not None and max_tiles < 0:
        raise InputError(f"--max-tiles must be >= 0, got {max_tiles}")
    if not (gpus_per_worker >= 0 and np.isfinite(gpus_per_worker)):
        raise InputError(f"--gpus-per-worker must be >= 0 (0.5 packs two actors per GPU), got {gpus_per_worker}")
    grid = TileGrid(n, m, tile, symmetric)
    selection = None
    if tiles is not None:
        selection = [(int(i), int(j)) for i, j in tiles]
        rows_t, cols_t = grid.shape
        bad = [t for t in selection if not grid.is_tile(*t)]
        if bad:
            raise InputError(f"tiles {bad[:5]} are not stored tiles of a {rows_t} x {cols_t} tile grid "
                             f"({'upper triangle i <= j' if symmetric else 'any i, j'})")

    # memory: the kernel's fixed working set plus one kernel call of s x s pairs must fit the per-worker budget
    if isinstance(source, kernels.KernelSpec):
        kernels.check_input_shape(source, rows.input_shape)
    if spec_json["arch"] in ("code", "callable"):  # before tracing it for its memory: a clear error first
        check_kernel_output(spec_json, kernel_callable, rows.input_shape)
    bpp = source.bytes_per_pair(rows.input_shape)
    fixed = source.fixed_bytes(rows.input_shape)
    if dtype == "float64":
        bpp, fixed = 2 * bpp, 2 * fixed
    budget = int(memory_budget) if memory_budget else default_memory_budget(actors_per_node(workers, gpus_per_worker, len(grid)))
    s = sub_block or min(sub_block_size(tile, bpp, budget - fixed), default_sub_block(tile, symmetric))
    if s < 1:
        raise InputError(
            f"this kernel needs about {fixed / 2**20:.1f} MiB of working memory plus {bpp / 2**20:.3g} MiB per pair "
            f"of inputs but the memory budget is {budget / 2**20:.1f} MiB per worker; raise --memory-budget, use "
            "fewer --workers, or smaller images"
        )

    versions = kernels.versions()
    against_fp = cols.fingerprint if cols is not None else None
    fingerprint = gram_fingerprint(json.dumps(spec_json, sort_keys=True), dtype, rows.fingerprint, against_fp, versions)
    want = {"spec": spec_json, "dtype": dtype, "data_fingerprint": rows.fingerprint, "against_fingerprint": against_fp,
            "versions": versions, "fingerprint": fingerprint, "tile": tile, "shape": [n, m]}
    new_attrs = {"spec": spec_json, "data_fingerprint": rows.fingerprint, "against_fingerprint": against_fp,
                 "versions": versions, "fingerprint": fingerprint, "data_path": _abspath(rows.path),
                 "against_path": _abspath(cols.path) if cols is not None else None,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}

    storage.check_disjoint(out, [("DATA", rows.path), ("--against", cols.path if cols is not None else None)], "--out")
    lock = _claim_store(out, overwrite)
    try:
        if dict(lock.group.attrs).get("kernelscale") == "gram" and not overwrite:  # re-checked under the lock
            store = open_gram(out)
            if store.fingerprint != fingerprint or store.tile != tile or list(store.shape) != [n, m]:
                diffs = _describe_mismatch(store.attrs, want)
                raise StoreError(
                    f"{out} holds a different Gram: {'; '.join(diffs) or 'fingerprint differs'}. Pass --overwrite to "
                    "replace it, or choose another --out"
                )
        else:
            reset_gram(lock.group)
            create_gram(out, n=n, m=m, tile=tile, dtype=dtype, symmetric=symmetric, attrs=new_attrs, group=lock.group)
        store = open_gram(out, "r+")
        t_plan = time.perf_counter()
        done = store.done_tiles()
        plan = TilePlan(grid, done=done, selection=selection, max_tiles=max_tiles)
        plan_seconds = time.perf_counter() - t_plan
        job = GramJob(out=out, data=rows.path, against=cols.path if cols is not None else None,
                      spec=canonical_json(spec_json), dtype=dtype, tile=tile, sub_block=s, cache_blocks=cache_blocks,
                      allow_code=spec_json["arch"] == "code", input_shape=tuple(rows.input_shape))
        log.info("%s: %d tiles, %d present, %d to compute (tile %d, kernel calls %d x %d, %.0f MiB budget)",
                 out, len(grid), len(done), plan.total, tile, s, s, budget / 2**20)
        planned = plan.tiles()
        run = _run_workers(plan, job, kernel_callable, workers, gpus_per_worker, address, progress)
        if run["tiles"]:
            _recompute_lost(planned, store, run, lambda missing: _run_workers(
                TilePlan(grid, selection=missing), job, kernel_callable, workers, gpus_per_worker,
                address, progress))
        seconds = time.perf_counter() - t_start
        record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds)),
                  "seconds": round(seconds, 3), "compute_seconds": round(run["seconds"], 3),
                  "tiles_computed": run["tiles"], "entries": run["entries"], "workers": run["workers"],
                  "entries_per_s": round(run["entries"] / run["seconds"], 1) if run["seconds"] > 0 and run["entries"] else None}
        if run["tiles"]:
            store.group.attrs["runs"] = (list(store.attrs.get("runs", [])) + [record])[-RUNS_KEPT:]
    finally:
        lock.release()
    seconds = time.perf_counter() - t_start
    skipped = len(done) if selection is None else 0
    return {
        "path": out,
        "shape": [n, m],
        "symmetric": symmetric,
        "tile": tile,
        "dtype": dtype,
        "fingerprint": fingerprint,
        "tiles_total": len(grid),
        "tiles_computed": run["tiles"],
        "tiles_skipped": skipped,
        "tiles_missing": len(grid) - len(done) - (run["tiles"] if selection is None else 0),
        "seconds": round(seconds, 3),
        "compute_seconds": round(run["seconds"], 3),
        "plan_seconds": round(plan_seconds, 3),
        "entries_per_s": round(run["entries"] / seconds, 1) if seconds > 0 else 0.0,
        "workers": run["workers"],
        "sub_block": s,
        "memory_budget": budget,
        "nodes": run["nodes"],
        "tile_seconds": run["tile_seconds"],
    }


def check_kernel_output(spec_json: dict[str, Any], kernel_callable: Any, input_shape: tuple[int, ...]) -> None:
    """Trace a user kernel on blocks of 2 and 3 rows (shapes only, nothing computed) and refuse, before any
    compute, a kernel that does not return one number per pair of images."""
    import jax  # noqa: PLC0415

    what = spec_json.get("params", {}).get("target") or spec_json.get("params", {}).get("kernel_id") or "kernel_fn"
    fn = block_kernel(spec_json, kernel_callable)
    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((2, *input_shape), "float32"),
                             jax.ShapeDtypeStruct((3, *input_shape), "float32"))
    except KernelscaleError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of user code, as one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"the kernel of {what} fails on inputs of shape {tuple(input_shape)}: "
                         f"{type(exc).__name__}: {first}") from exc
    shape = tuple(getattr(out, "shape", ()))
    if shape != (2, 3):
        raise InputError(
            f"the kernel of {what} returns shape {shape} for 2 x 3 images of shape {tuple(input_shape)}; it must "
            "return one number per pair of images, (2, 3): end the network with a readout to one output "
            "(stax.Flatten() or stax.GlobalAvgPool(), then stax.Dense(1))")


def _recompute_lost(planned: set[tuple[int, int]], store: GramStore, run: dict[str, Any],
                    rerun: Callable[[list[tuple[int, int]]], dict[str, Any]]) -> None:
    """Recompute planned tiles missing from the store after a run (the listing is the truth: a write pending in
    an actor that died is lost with it), at most MISSING_ROUNDS times; ``run`` accumulates the extra work."""
    for _ in range(MISSING_ROUNDS):
        missing = sorted(planned - store.done_tiles())
        if not missing:
            return
        log.warning("%d computed tiles are not in the store (a worker died before writing them); recomputing "
                    "them", len(missing))
        _merge_runs(run, rerun(missing))
    missing = sorted(planned - store.done_tiles())
    if missing:
        raise KernelscaleError(f"{len(missing)} tiles (first {missing[0]}) are still missing after "
                               f"{MISSING_ROUNDS} recompute rounds; rerun the same command to resume")


def _merge_runs(run: dict[str, Any], again: dict[str, Any]) -> None:
    """Add a recompute round's counts to the main run's (tiles counted once: they were lost, then redone)."""
    run["entries"] += again["entries"]
    run["seconds"] += again["seconds"]
    for node, count in again["nodes"].items():
        run["nodes"][node] = run["nodes"].get(node, 0) + count
    for part, value in again["tile_seconds"].items():
        run["tile_seconds"][part] = run["tile_seconds"].get(part, 0.0) + value


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _worker_error(exc: Any, what: str) -> KernelscaleError:
    """A worker's RayTaskError as one line: the original KernelscaleError's own message (same class, so the
    same exit code), else ``what: ExceptionType: first line of its message``; never Ray's traceback or ANSI codes."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and storage.is_disk_full(cause) and not isinstance(cause, KernelscaleError):
        return KernelscaleError(f"{what}: {one_line(cause)}")
    if isinstance(cause, KernelscaleError):
        return type(cause)(one_line(cause))
    if isinstance(cause, BaseException):
        return KernelscaleError(f"{what}: {type(cause).__name__}: {one_line(cause)}")
    return KernelscaleError(f"{what}: {one_line(exc)}")


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without ANSI colour codes."""
    lines = [ln.strip() for ln in ANSI_ESCAPE.sub("", str(exc)).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _abspath(path: str) -> str:
    return path if storage.is_url(path) else os.path.abspath(path)


def _run_workers(plan: TilePlan, job: GramJob, kernel_callable: Any,
                 workers: int | None, gpus_per_worker: float, address: str | None, progress: bool) -> dict[str, Any]:
    """Start the actors, feed them the plan with ray.wait, and collect status records."""
    result: dict[str, Any] = {"tiles": 0, "entries": 0, "nodes": {}, "workers": 0, "seconds": 0.0,
                              "tile_seconds": {"read": 0.0, "kernel": 0.0, "write": 0.0, "stall": 0.0}}
    if plan.total == 0:
        return result
    import ray  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    ray_info = runtime.ensure_ray(address)
    gpus_now = ray.cluster_resources().get("GPU", 0)
    if gpus_per_worker > 0 and gpus_now < gpus_per_worker:
        # a cluster on loopback (the local one, or nodes started by hand on this machine) has no autoscaler:
        # no actor could ever start
        if ray_info.get("started_local") or str(ray_info.get("address", "")).startswith(("127.0.0.1", "localhost")):
            raise InputError(f"--gpus-per-worker {gpus_per_worker}: this machine has {gpus_now:g} GPUs visible to "
                             "Ray; use --gpus-per-worker 0 (CPU) or run on a cluster with GPU nodes")
        log.warning("the Ray cluster has %g GPUs now; the actors wait until the autoscaler adds GPU nodes", gpus_now)
    t0 = time.perf_counter()
    n_workers = min(workers or runtime.cluster_slots(gpus_per_worker), plan.total)
    remote_cls = ray.remote(GramWorker)
    opts = runtime.actor_options(gpus_per_worker)
    callable_ref = ray.put(kernel_callable) if kernel_callable is not None else None
    actors = [remote_cls.options(**opts).remote(job, callable_ref) for _ in range(n_workers)]
    result["workers"] = n_workers
    # trace the kernel once here while the actors start; each actor compiles the serialised program
    blob_ref = ray.put(export_kernel(job, kernel_callable))
    for actor in actors:
        actor.load_kernel.remote(blob_ref)
    last_row: list[int | None] = [None] * n_workers
    inflight: dict[Any, tuple[int, tuple[int, int]]] = {}
    failures: dict[tuple[int, int], int] = {}
    retired: set[int] = set()  # actors already flushed and killed (nothing left for them)

    def submit(k: int) -> None:
        nxt = plan.next(last_row[k])
        if nxt is not None:
            last_row[k] = nxt[0]
            inflight[actors[k].compute.remote(*nxt)] = (k, nxt)

    def flush(k: int) -> None:
        """Wait for actor k's pending write. If the actor is lost, the end-of-run listing finds the tile."""
        try:
            result["tile_seconds"]["write"] += ray.get(actors[k].flush.remote())["write_s"]
        except ray.exceptions.RayTaskError as exc:
            raise _worker_error(exc, "a worker failed writing its last tile") from exc
        except ray.exceptions.RayError as exc:
            log.warning("worker lost before its last write was confirmed (%s); the listing check will tell", exc)

    bar = tqdm(total=plan.total, desc="gram", unit="tile", disable=not progress)
    tracker = ProgressWriter(open_gram(job.out, "r+").group, plan.total)  # read by `kernelscale status`
    try:
        for _ in range(IN_FLIGHT_PER_WORKER):
            for k in range(n_workers):
                submit(k)
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                k, tile_ij = inflight.pop(ref)
                try:
                    status = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise _worker_error(exc, f"tile {tile_ij} failed in a worker") from exc
                except ray.exceptions.RayError as exc:  # actor lost beyond Ray's own retries
                    failures[tile_ij] = failures.get(tile_ij, 0) + 1
                    if failures[tile_ij] > 3:
                        raise KernelscaleError(f"tile {tile_ij} failed {failures[tile_ij]} times: {exc}") from exc
                    log.warning("tile %s lost (%s); rescheduling", tile_ij, exc)
                    plan.push_back(tile_ij)
                    actors[k] = remote_cls.options(**opts).remote(job, callable_ref)
                    actors[k].load_kernel.remote(blob_ref)
                    last_row[k] = None
                    submit(k)
                    continue
                result["tiles"] += 1
                result["entries"] += status["entries"]
                result["nodes"][status["node"]] = result["nodes"].get(status["node"], 0) + 1
                for part in ("read", "kernel", "write", "stall"):
                    result["tile_seconds"][part] += status[f"{part}_s"]
                bar.update(1)
                tracker.tile_done(status["entries"])
                submit(k)
                if not any(slot == k for slot, _ in inflight.values()):
                    flush(k)
                    retired.add(k)
                    # Nothing left for this actor: free its CPU/GPU now. An actor Ray restarts after losing its
                    # node needs a free slot; on a fully packed cluster its retried tiles would otherwise wait
                    # forever for actors that sit idle until the run ends.
                    ray.kill(actors[k], no_restart=True)
    finally:
        bar.close()
        tracker.close()
        for ref in list(inflight):
            ray.cancel(ref, force=False)
        # let pending background writes land (or fail) before the actors go: nothing may be written into the
        # store after this function returns, e.g. while a caller inspects a store after an error
        live = [actor for k, actor in enumerate(actors) if k not in retired]
        if live:
            ray.wait([actor.flush.remote() for actor in live], num_returns=len(live), timeout=QUIESCE_SECONDS)
        for actor in actors:
            ray.kill(actor, no_restart=True)
    result["seconds"] = time.perf_counter() - t0
    result["tile_seconds"] = {k: round(v, 3) for k, v in result["tile_seconds"].items()}
    return result


# ----------------------------------------------------------------------------------------------------------
# Status and verification
# ----------------------------------------------------------------------------------------------------------


def gram_status(path: str) -> dict[str, Any]:
    """Tiles done/total, fingerprint summary, throughput and ETA of a Gram store (one listing).

    While a driver holds the store's lock, the rate is the one it measures in this run (``rate_from``:
    ``running driver``); otherwise that of the last finished run (``last run``).
    """
    store = open_gram(path)
    grid = store.grid
    done = store.done_tiles()
    total = len(grid)
    attrs = store.attrs
    runs = list(attrs.get("runs", []))
    rates = [r["entries_per_s"] for r in runs if r.get("entries_per_s")]
    rate = rates[-1] if rates else None
    missing_entries = grid.n * grid.m
    if grid.symmetric:
        missing_entries = grid.n * (grid.n + 1) // 2  # approximate stored entries
    done_entries = sum(tile_entries(grid, t) for t in done)
    stored_entries = sum(tile_entries(grid, t) for t in grid) if total <= 200_000 else missing_entries
    remaining = max(0, stored_entries - done_entries)
    lock = GramLock(store).read()
    spec = attrs.get("spec", {})
    live = live_rate(read_progress(store.group)) if lock is not None else None
    tiles_rate = round(rate * total / stored_entries, 4) if rate and stored_entries else None
    rate_from = "last run" if rate else None
    if live is not None:
        rate, tiles_rate, rate_from = round(live["entries_per_s"], 1), round(live["tiles_per_s"], 4), "running driver"
    return {
        "path": path,
        "shape": list(store.shape),
        "symmetric": store.symmetric,
        "tile": store.tile,
        "dtype": attrs.get("dtype"),
        "tiles_done": len(done),
        "tiles_total": total,
        "complete": len(done) == total,
        "kernel": f"{spec.get('arch')} {spec.get('kernel')} {json.dumps(spec.get('params', {}), sort_keys=True)}",
        "fingerprint": store.fingerprint,
        "data_fingerprint": attrs.get("data_fingerprint"),
        "against_fingerprint": attrs.get("against_fingerprint"),
        "data_path": attrs.get("data_path"),
        "versions": attrs.get("versions"),
        "runs": len(runs),
        "entries_per_s": rate,
        "tiles_per_s": tiles_rate,
        "eta_seconds": round(remaining / rate, 1) if rate else None,
        "rate_from": rate_from,
        "storage_bytes": stored_entries * np.dtype(attrs.get("dtype", "float32")).itemsize,
        "locked_by": None if lock is None else {k: lock.get(k) for k in ("host", "pid", "started")},
    }


def verify_gram(path: str, *, repair: bool = False, progress: bool = True, workers: int | None = None,
                address: str | None = None, kernel_fn: Any = None, allow_code: bool = False) -> dict[str, Any]:
    """Check every tile: present, checksum-valid, finite, diagonal tiles exactly symmetric.

    With ``repair``, bad tiles are deleted and recomputed from the dataset store(s) recorded in the attributes
    (``kernel_fn`` must be passed again for Grams of a user callable; a Gram of user code needs ``allow_code``,
    checked before any tile is touched). The dataset store(s) it was built from, when present, are checked in
    full against their fingerprints. ``ok`` is True when all tiles are good
    (after repair, if requested).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    t0 = time.perf_counter()
    store = open_gram(path)
    spec = store.attrs["spec"]
    if repair and spec.get("arch") != "callable":  # user code only by --allow-code, refused before any work
        kernels.load_spec(spec, allow_code=allow_code, where=path)
    grid = store.grid
    done = store.done_tiles()
    bad: dict[tuple[int, int], str] = {}
    for ij in tqdm(list(grid), desc="verify", unit="tile", disable=not progress):
        if ij not in done:
            bad[ij] = "missing"
            continue
        try:
            values = store.read_tile(*ij)
        except StoreError as exc:
            bad[ij] = "corrupt" if "corrupt" in str(exc) else "non-finite"
            continue
        if grid.symmetric and ij[0] == ij[1] and not np.array_equal(values, values.T):
            bad[ij] = "asymmetric"
    summary: dict[str, Any] = {
        "path": path, "tiles_total": len(grid), "tiles_checked": len(grid) - sum(v == "missing" for v in bad.values()),
        "tiles_bad": len(bad), "bad": [{"tile": list(k), "problem": v} for k, v in sorted(bad.items())][:100],
        "repaired": 0, "ok": not bad,
    }
    summary["data"] = _verify_data(store)
    if any(not d["ok"] for d in summary["data"]):
        summary["ok"] = False
    if bad and repair:
        attrs = store.attrs
        data_path = attrs.get("data_path")
        if not data_path or not storage.exists(data_path):
            raise StoreError(f"{path}: cannot repair: the dataset store it was built from ({data_path}) is not there")
        if spec.get("arch") == "callable" and kernel_fn is None:
            raise InputError(f"{path} was built from a user kernel_fn; pass it again (verify_gram(..., kernel_fn=f))")
        changed = [d for d in summary["data"] if not d["ok"]]
        if changed:
            raise StoreError(f"cannot repair {path}: {changed[0]['problem']}; re-ingest the data and recompute the Gram")
        writable = open_gram(path, "r+")
        for ij in bad:
            if ij in done:
                storage.delete_chunk(writable.array, ij)
        kernel = kernel_fn if spec.get("arch") == "callable" else kernels.KernelSpec.from_json(spec)
        result = compute_gram(data_path, kernel, path, against=attrs.get("against_path"), tile=store.tile,
                              dtype=attrs["dtype"], workers=workers, address=address, progress=progress,
                              kernel_id=spec.get("params", {}).get("kernel_id"), get=spec.get("kernel", "ntk"),
                              tiles=sorted(bad))
        summary["repaired"] = result["tiles_computed"]
        recheck = verify_gram(path, repair=False, progress=False)
        summary["ok"] = recheck["ok"] and all(d["ok"] for d in summary["data"])
        summary["tiles_bad_after_repair"] = recheck["tiles_bad"]
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def _verify_data(store: GramStore) -> list[dict[str, Any]]:
    """Full content check of the dataset store(s) a Gram records (rows, labels, preprocessing hashed again and
    compared with the fingerprint the Gram was built from). Stores no longer there are reported, not checked."""
    out = []
    for key, fp_key in (("data_path", "data_fingerprint"), ("against_path", "against_fingerprint")):
        path = store.attrs.get(key)
        if not path:
            continue
        record: dict[str, Any] = {"path": path, "ok": True, "checked": False}
        if storage.exists(path):
            try:
                ds = open_dataset(path)
                if ds.fingerprint != store.attrs.get(fp_key):
                    raise StoreError(f"{path} is now another dataset (fingerprint {ds.fingerprint[:19]}...) than "
                                     f"the Gram was built from ({str(store.attrs.get(fp_key))[:19]}...)")
                ds.check_content(full=True)
                record["checked"] = True
            except StoreError as exc:
                record.update(ok=False, checked=True, problem=str(exc))
        else:
            record["problem"] = "not there (not checked)"
        out.append(record)
    return out
