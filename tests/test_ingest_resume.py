"""Resumable ingest: an ingest stopped mid-way (Ctrl-C, SIGTERM, SIGKILL) continues on a rerun of the same
command, keeps the rows already written, and gives a store bitwise identical to an uninterrupted ingest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from kernelscale.data import ingestion
from kernelscale.data import AffineMap, ArraySource, ingest, open_dataset, partial_path
from kernelscale.errors import InputError

N = 9000  # 8x8x1 rows: 4,096 rows per chunk and per block, so three blocks


def _npz(tmp_path: Path, n: int = N) -> str:
    rng = np.random.default_rng(1)
    path = tmp_path / "src.npz"
    np.savez(path, images=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), labels=np.arange(n) % 4)
    return str(path)


def _content(path: str) -> dict:
    """Every array's values and every attribute except the creation time."""
    group = zarr.open_group(path, mode="r")
    arrays = {name: np.asarray(arr[...]) for name, arr in group.arrays()}
    if "preprocess" in group:
        arrays |= {f"preprocess/{k}": np.asarray(a[...]) for k, a in group["preprocess"].arrays()}
    attrs = {k: v for k, v in group.attrs.asdict().items() if k != "created"}
    return {"arrays": arrays, "attrs": attrs}


def _same(a: dict, b: dict) -> bool:
    return a["attrs"] == b["attrs"] and a["arrays"].keys() == b["arrays"].keys() and all(
        a["arrays"][k].dtype == b["arrays"][k].dtype and np.array_equal(a["arrays"][k], b["arrays"][k], equal_nan=True)
        for k in a["arrays"])


class _Reads:
    """Counts the rows the source decodes; raises KeyboardInterrupt (Ctrl-C) on call number ``stop_at``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None):
        self.rows, self.calls, self.stop_at = 0, 0, stop_at
        original = ArraySource.read_pixels

        def read_pixels(source: ArraySource, idx: np.ndarray) -> np.ndarray:
            self.calls += 1
            if self.calls == self.stop_at:
                raise KeyboardInterrupt
            self.rows += len(idx)
            return original(source, idx)

        monkeypatch.setattr(ArraySource, "read_pixels", read_pixels)


@pytest.mark.parametrize("options", [dict(store_dtype="float32", preprocess="standardize", augment="hflip"),
                                     dict(store_dtype="uint8", preprocess="standardize")])
def test_interrupted_ingest_continues_and_equals_uninterrupted_ingest(tmp_path, monkeypatch, options):
    src = _npz(tmp_path)
    whole, cut = str(tmp_path / "whole.zarr"), str(tmp_path / "cut.zarr")
    ingest(src, whole, progress=False, **options)
    with monkeypatch.context() as m:
        _Reads(m, stop_at=3)  # blocks 1 and 2 written, stopped while decoding block 3
        with pytest.raises(KeyboardInterrupt):
            ingest(src, cut, progress=False, **options)
    assert not os.path.exists(cut) and os.path.isdir(partial_path(cut))
    reads = _Reads(monkeypatch)
    ingest(src, cut, progress=False, **options)
    assert reads.rows == N - 2 * 4096  # only the block that was not written is decoded again
    assert _same(_content(cut), _content(whole)) and not os.path.exists(partial_path(cut))


def test_stopped_after_the_statistics_continues_without_recomputing_them(tmp_path, monkeypatch):
    src = _npz(tmp_path)
    whole, cut = str(tmp_path / "whole.zarr"), str(tmp_path / "cut.zarr")
    ingest(src, whole, preprocess="standardize", store_dtype="float16", progress=False)
    calls = {"apply": 0}
    original = AffineMap.apply

    def apply_then_stop(self, pixels):
        calls["apply"] += 1
        if calls["apply"] == 2:
            raise KeyboardInterrupt
        return original(self, pixels)

    with monkeypatch.context() as m:
        m.setattr(AffineMap, "apply", apply_then_stop)
        with pytest.raises(KeyboardInterrupt):
            ingest(src, cut, preprocess="standardize", store_dtype="float16", progress=False)
    reads = _Reads(monkeypatch)
    monkeypatch.setattr(ingestion, "compute_statistics", lambda *a, **k: pytest.fail("statistics computed again"))
    ingest(src, cut, preprocess="standardize", store_dtype="float16", progress=False)
    assert reads.rows == 0 and _same(_content(cut), _content(whole))


def test_partial_store_of_other_options_is_started_again_and_a_foreign_folder_is_refused(tmp_path, monkeypatch):
    src = _npz(tmp_path)
    whole, cut = str(tmp_path / "whole.zarr"), str(tmp_path / "cut.zarr")
    ingest(src, whole, preprocess="none", progress=False)
    with monkeypatch.context() as m:
        _Reads(m, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            ingest(src, cut, preprocess="standardize", progress=False)
    reads = _Reads(monkeypatch)
    ingest(src, cut, preprocess="none", progress=False)  # another plan: the partial store is not reused
    assert reads.rows == N and _same(_content(cut), _content(whole))
    foreign = tmp_path / "mine.zarr.partial-ingest"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a kernelscale store"):
        ingest(src, str(tmp_path / "mine.zarr"), progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_stopped_during_the_val_split_continues_with_val_only(tmp_path, monkeypatch):
    src = _npz(tmp_path, n=400)
    kw = dict(preprocess="standardize", val_fraction=0.25, progress=False)
    ref_t, ref_v = str(tmp_path / "rt.zarr"), str(tmp_path / "rv.zarr")
    ingest(src, ref_t, val_out=ref_v, **kw)
    out, val = str(tmp_path / "t.zarr"), str(tmp_path / "v.zarr")
    with monkeypatch.context() as m:
        _Reads(m, stop_at=2)  # call 1: the train rows; call 2: the val rows
        with pytest.raises(KeyboardInterrupt):
            ingest(src, out, val_out=val, **kw)
    assert os.path.isdir(out) and not os.path.exists(val)
    reads = _Reads(monkeypatch)
    summary = ingest(src, out, val_out=val, **kw)
    assert reads.rows == 100 and summary["val"]["n"] == 100
    assert _same(_content(out), _content(ref_t)) and _same(_content(val), _content(ref_v))
    with pytest.raises(InputError, match="already exists"):  # a complete ingest is not redone silently
        ingest(src, out, val_out=val, **kw)


_SLOW_INGEST = """
import sys, time
from kernelscale.data import ArraySource
from kernelscale.cli import main
original = ArraySource.read_pixels
def slow(self, idx):
    out = original(self, idx)
    time.sleep(0.0 if int(idx[0]) == 0 else 60)  # the first block at once, then hang until killed
    return out
ArraySource.read_pixels = slow
sys.exit(main(["ingest", sys.argv[1], sys.argv[2], "--store-dtype", "uint8", "--no-progress"]))
"""


def test_sigkilled_cli_ingest_continues_on_rerun_bitwise(tmp_path):
    src = _npz(tmp_path)
    whole, cut = str(tmp_path / "whole.zarr"), str(tmp_path / "cut.zarr")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INGEST, src, cut], cwd=tmp_path)
    meta = Path(partial_path(cut)) / "zarr.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if meta.exists() and json.loads(meta.read_text())["attributes"].get("ingest_progress", {}).get("pixels_done"):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    progress = json.loads(meta.read_text())["attributes"]["ingest_progress"]
    assert progress["pixels_done"] == 4096
    from kernelscale.cli import main

    assert main(["ingest", src, cut, "--store-dtype", "uint8", "--no-progress"]) == 0
    ingest(src, whole, store_dtype="uint8", progress=False)
    assert _same(_content(cut), _content(whole))
