"""Chunk-aware KIP target sampling (``--target-sampling chunks``): bytes read per step within 2x of the bytes
used (counted at the store), classes as balanced as the chunks allow, every chunk read equally often, and
batches that are a pure function of (seed, step), for shards too."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from kernelscale.data import ingestion
from kernelscale.data import ingest, open_dataset
from kernelscale.kip.targets import ChunkPlan, TargetSampler, sampling_mode, spread
from kernelscale.kip.augment import TargetAugment

ROW_BYTES = 8 * 8 * 1 * 4  # one float32 row of the test store
ROWS_PER_CHUNK = 50


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """2,000 rows of 8x8x1, 10 classes mixed along the rows, 50 rows per chunk (40 chunks)."""
    root = tmp_path_factory.mktemp("chunks")
    rng = np.random.default_rng(0)
    src = root / "src.npz"
    np.savez(src, images=rng.integers(0, 256, (2000, 8, 8, 1), dtype=np.uint8), labels=rng.permutation(2000) % 10)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ingestion, "CHUNK_BYTES", ROWS_PER_CHUNK * ROW_BYTES)
        ingest(str(src), str(root / "d.zarr"), progress=False)
    return str(root / "d.zarr")


class _ChunkReads:
    """Counts the x chunks zarr actually fetches from the local store."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.keys: list[str] = []
        original = zarr.storage.LocalStore.get

        async def get(store, key, *args, **kwargs):
            if key.startswith("x/c/"):
                self.keys.append(key)
            return await original(store, key, *args, **kwargs)

        monkeypatch.setattr(zarr.storage.LocalStore, "get", get)


def test_spread_is_as_even_as_availability_allows():
    rng = np.random.default_rng(0)
    counts = spread(10, np.array([5, 1, 5, 0]), rng)
    assert counts.sum() == 10 and counts[1] == 1 and counts[3] == 0 and sorted(counts[[0, 2]]) == [4, 5]
    assert spread(7, np.array([2, 2]), rng).tolist() == [2, 2]  # fewer rows than asked: all of them
    many = spread(1000, np.full(1000, 3), rng)
    assert many.tolist() == [1] * 1000


@pytest.mark.parametrize("rows_per_chunk,batch", [(682, 2000), (170, 2000), (2730, 2000), (4096, 100), (50, 37)])
def test_chunk_plan_reads_at_most_twice_the_rows_it_uses(rows_per_chunk, batch):
    n = 40 * rows_per_chunk + 7
    labels = np.random.default_rng(1).permutation(n) % 100
    plan = ChunkPlan(labels, 100, rows_per_chunk, batch, seed=3)
    rows_read = rows_used = 0
    for visit in range(3):
        steps = range(visit * plan.k, (visit + 1) * plan.k)
        batches = [plan.indices(s) for s in steps]
        touched = np.unique(np.concatenate(batches) // rows_per_chunk)
        assert set(touched) <= set(plan.chunks(visit))  # the group's chunks only
        rows_read += sum(min(rows_per_chunk, n - c * rows_per_chunk) for c in plan.chunks(visit))
        rows_used += sum(len(b) for b in batches)
        assert all(len(np.unique(b)) == batch for b in batches)  # no row twice in a batch
        if plan.k > 1:  # the steps of one group use disjoint rows
            assert len(np.unique(np.concatenate(batches))) == plan.k * batch
    assert rows_read <= 2 * rows_used, (rows_read, rows_used)


def test_every_chunk_is_read_once_per_epoch():
    plan = ChunkPlan(np.arange(1000) % 4, 4, 25, 60, seed=0)  # 40 chunks, 4 per group, 10 groups per epoch
    seen = np.concatenate([plan.chunks(v) for v in range(plan.groups)])
    assert len(seen) == len(np.unique(seen)) == plan.groups * plan.m
    assert not np.array_equal(plan.chunks(0), plan.chunks(plan.groups))  # the next epoch is another permutation


def test_batches_balance_classes_as_the_rows_sampler_does(store):
    ds = open_dataset(store)
    chunked = TargetSampler(ds, 100, seed=0, memory_limit=0, mode="chunks")
    for step in range(5):
        counts = np.bincount(ds.labels[chunked.indices(step)], minlength=10)
        assert counts.sum() == 100 and counts.max() - counts.min() <= 2, counts
    assert not np.array_equal(chunked.indices(0), chunked.indices(1))


@pytest.mark.parametrize("batch", [100, 20])  # 20: one chunk (50 rows) serves two steps
def test_bytes_read_per_target_row_chunks_against_rows_sampling(store, monkeypatch, batch):
    ds = open_dataset(store)
    per_row = {}
    for mode in ("rows", "chunks"):
        reads = _ChunkReads(monkeypatch)
        sampler = TargetSampler(ds, batch, seed=0, memory_limit=0, mode=mode)
        xs = [sampler.batch(step)[0] for step in range(8)]
        assert len(reads.keys) * ROWS_PER_CHUNK * ROW_BYTES == sampler.bytes_read  # the count is what zarr read
        per_row[mode] = sampler.bytes_read / sampler.rows_read
        monkeypatch.undo()
        for step, x in enumerate(xs):
            assert x.dtype == np.float32 and np.array_equal(x, ds.take(sampler.indices(step)))  # the plan's rows
    assert per_row["chunks"] <= 2 * ROW_BYTES  # within 2x of the bytes used
    assert per_row["rows"] > 5 * ROW_BYTES  # random rows: nearly every row costs a chunk


def test_chunk_batches_are_deterministic_and_shards_split_them(store):
    ds = open_dataset(store)
    augment = TargetAugment(shift=1, flip=True)
    a = TargetSampler(ds, 90, seed=5, memory_limit=0, augment=augment, mode="chunks")
    b = TargetSampler(ds, 90, seed=5, memory_limit=0, augment=augment, mode="chunks")
    x1, y1 = a.batch(7)
    x2, y2 = b.batch(7)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    parts = [a.batch(7, part, 3) for part in range(3)]
    xs = np.concatenate([p[0] for p in parts])
    key = lambda x: np.sort(x.reshape(len(x), -1).sum(1))  # noqa: E731 - the same rows, order aside
    np.testing.assert_allclose(key(xs), key(x1), rtol=1e-6)
    whole, shard = (TargetSampler(ds, 90, seed=5, memory_limit=0, augment=augment, mode="chunks") for _ in range(2))
    whole.batch(7)
    shard.batch(7, 0, 3)
    assert 0 < shard.bytes_read < whole.bytes_read  # a shard reads only the chunks of its slice


def test_auto_sampling_is_chunks_only_beyond_the_memory_limit(store):
    ds = open_dataset(store)
    assert sampling_mode("auto", ds, memory_limit=1 << 30) == "rows"
    assert sampling_mode("auto", ds, memory_limit=1000) == "chunks"
    with pytest.raises(ValueError, match="--target-sampling must be auto, rows, chunks"):
        sampling_mode("random", ds)


def test_distill_with_chunk_sampling_resumes_bitwise_and_keeps_its_sampling(store, tmp_path, monkeypatch):
    """The store as a kill right after the step-2 checkpoint leaves it, resumed, ends equal to the whole run."""
    import shutil

    from kernelscale.kip import run as kip_run
    from kernelscale.kip.store import open_distilled
    from kernelscale.errors import InputError

    kw = dict(arch="fc:depth=2", ipc=1, target_batch=40, steps=4, checkpoint_every=2, seed=2, progress=False,
              target_augment="none")
    full, part = str(tmp_path / "full.zarr"), str(tmp_path / "part.zarr")
    real_commit = kip_run._commit

    def commit_and_copy(st, state, history, step):
        real_commit(st, state, history, step)
        if step == 2:
            shutil.copytree(full, part)

    monkeypatch.setattr(kip_run, "_commit", commit_and_copy)
    s = kip_run.distill(store, out=full, target_sampling="chunks", **kw)
    monkeypatch.setattr(kip_run, "_commit", real_commit)
    assert s["target_sampling"] == "chunks" and s["target_bytes_read_per_row"] <= 2 * ROW_BYTES
    assert open_distilled(part).attrs["checkpoint"] == 2
    with pytest.raises(InputError, match="target_sampling"):
        kip_run.distill(store, out=part, target_sampling="rows", resume=True, **kw)
    s2 = kip_run.distill(store, out=part, resume=True, **kw)  # auto continues with the run's own sampling
    assert s2["start_step"] == 2 and s2["target_sampling"] == "chunks"
    (xa, ya), (xb, yb) = open_distilled(full).support(), open_distilled(part).support()
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert np.array_equal(open_distilled(full).history()["loss"], open_distilled(part).history()["loss"])


def test_ingest_shuffle_spreads_class_sorted_rows_so_chunk_batches_see_every_class(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (1000, 8, 8, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 100)  # stored class by class, like an ImageFolder
    np.savez(tmp_path / "src.npz", images=images, labels=labels)
    stores = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ingestion, "CHUNK_BYTES", ROWS_PER_CHUNK * ROW_BYTES)
        for shuffle in (False, True):
            stores[shuffle] = open_dataset(ingest(str(tmp_path / "src.npz"), str(tmp_path / f"{shuffle}.zarr"),
                                                  shuffle=shuffle, seed=4, progress=False)["path"])
    sorted_rows = lambda ds: np.sort(ds.stored(0, ds.n).reshape(ds.n, -1), axis=0)  # noqa: E731
    assert np.array_equal(sorted_rows(stores[True]), sorted_rows(stores[False]))  # the same rows, reordered
    per_chunk = {k: [len(np.unique(ds.labels[a : a + ROWS_PER_CHUNK])) for a in range(0, ds.n, ROWS_PER_CHUNK)]
                 for k, ds in stores.items()}
    assert max(per_chunk[False]) <= 2 and min(per_chunk[True]) == 10  # every chunk holds every class
    counts = {k: np.bincount(ds.labels[TargetSampler(ds, 50, 0, 0, mode="chunks").indices(0)], minlength=10)
              for k, ds in stores.items()}
    assert (counts[False] > 0).sum() <= 4 and counts[True].min() == 5 == counts[True].max()
