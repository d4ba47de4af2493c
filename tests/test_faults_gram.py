"""Faults injected into `kernelscale gram` (issue 9): Ray workers SIGKILLed at random moments, the driver
SIGKILLed mid-run and rerun, two drivers on one store, deleted and corrupted tiles, a full disk.

What must hold: the finished store is bitwise identical to an undisturbed run, a rerun computes exactly the
missing tiles, a stale lock never blocks it, and a full disk stops the run with a clear message and a
consistent store that resumes once there is space.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kernelscale import compute_gram, open_gram, parse_arch
from kernelscale.cli import main
from kernelscale.gram.engine import gram_status, verify_gram
from kernelscale.errors import KernelscaleError
from kernelscale.gram.store import GramLock

from fault_helpers import (
    Tmpfs,
    count_tiles,
    flip_byte,
    gram_worker_pids,
    kill_session_leftovers,
    last_json,
    npz_store,
    partial_files,
    run_cli_process,
    session_pids,
    sigkill,
    start_cli,
    synthetic_images,
    tile_files,
    wait_for,
)

ARCH = "fc:depth=3"
TILE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """256 synthetic 4x4 rows and their undisturbed reference Gram (tile 16: 136 stored tiles)."""
    root = tmp_path_factory.mktemp("faults_gram")
    path = npz_store(root, "syn", synthetic_images(256, seed=1))
    return {"root": root, "data": path}


@pytest.fixture(scope="module")
def reference(data, ray_local) -> dict:
    out = str(data["root"] / "reference.zarr")
    summary = compute_gram(data["data"], parse_arch(ARCH), out, tile=TILE, workers=2, progress=False)
    assert summary["tiles_computed"] == summary["tiles_total"] == 136
    return {"path": out, "tiles": tile_files(out), "matrix": open_gram(out).to_numpy()}


def _cli_gram(data: str, out: str, *extra: str) -> list[str]:
    return ["gram", data, "--arch", ARCH, "--out", out, "--tile", str(TILE), "--workers", "2", "--json",
            "--no-progress", *extra]


# -- Ray workers killed at random moments -------------------------------------------------------------------


def test_workers_sigkilled_at_random_moments_store_bitwise_identical(data, ray_local, tmp_path):
    """Kills are triggered by progress (tile counts), not by wall-clock luck, so a fast machine cannot finish the
    run before the faults land: 4 SIGKILLs at random progress points between 10% and 80% of the tiles."""
    path = npz_store(tmp_path, "many", synthetic_images(384, seed=3))  # tile 8: 1,176 stored tiles
    ref = str(tmp_path / "reference.zarr")
    compute_gram(path, parse_arch(ARCH), ref, tile=8, workers=2, progress=False)
    reference_tiles = tile_files(ref)
    total = len(reference_tiles)
    out = str(tmp_path / "killed.zarr")
    kills: list[int] = []
    stop = threading.Event()
    rnd = random.Random(9)
    thresholds = sorted(rnd.uniform(0.1, 0.8) * total for _ in range(4))

    def killer() -> None:
        import os
        import signal

        while not stop.is_set() and len(kills) < len(thresholds):
            time.sleep(0.05)  # listing ~1,000 chunk files is not free: poll at 20 Hz, not 100
            try:
                if count_tiles(out) < thresholds[len(kills)]:
                    continue
                pids = gram_worker_pids()
                if pids:
                    pid = rnd.choice(pids)
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
            except (ProcessLookupError, OSError):  # the process (or a chunk file) went away meanwhile
                continue

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        summary = compute_gram(path, parse_arch(ARCH), out, tile=8, workers=2, progress=False)
    finally:
        stop.set()
        thread.join()
    assert len(kills) >= 3, f"only {len(kills)} workers were killed before the run finished"
    assert summary["tiles_total"] == total
    assert tile_files(out) == reference_tiles  # every chunk, byte for byte
    np.testing.assert_array_equal(open_gram(out).to_numpy(), open_gram(ref).to_numpy())
    assert verify_gram(out, progress=False)["ok"]
    _report("worker_kill", kills=len(kills), tiles_total=total, tiles_computed=summary["tiles_computed"],
            leftover_partial_files=len(partial_files(out)))


# -- the driver killed, a second driver, the rerun ----------------------------------------------------------


@pytest.mark.slow
def test_driver_sigkill_second_driver_refused_rerun_computes_only_missing(data, reference, ray_local, tmp_path,
                                                                          capsys):
    out = str(tmp_path / "driver.zarr")
    address = None  # the subprocess drivers start their own local Ray, as a user's command does
    first = start_cli(*_cli_gram(data["data"], out), ray_address=address, log_path=tmp_path / "first.log")
    try:
        lock_file = Path(out) / "_lock" / "zarr.json"
        wait_for(lambda: lock_file.exists(), 90, "the first driver's lock")
        # a second driver on the same store, while the first one runs: refused before any compute
        code, stdout, stderr = run_cli_process(*_cli_gram(data["data"], out), ray_address=address)
        assert first.poll() is None, "the first driver finished before the second one was tried"
        assert code == 2, stderr
        assert "being computed by another kernelscale driver" in stderr and f"pid {first.pid}" in stderr
        assert last_json(stdout)["status"] == "error"
        wait_for(lambda: count_tiles(out) >= 10, 90, "ten tiles from the first driver")
        sigkill(first)
    finally:
        sigkill(first)
        kill_session_leftovers(first)  # its local Ray (raylet, gcs, actors) would outlive it
    wait_for(lambda: not session_pids(first), 60, "the dead driver's actors to go")  # no tile lands after we count
    present = count_tiles(out)
    assert 10 <= present < 136, present
    lock = GramLock(open_gram(out)).read()
    assert lock is not None and lock["pid"] == first.pid  # the crashed driver's lock is still there ...
    before = tile_files(out)

    code = main(_cli_gram(data["data"], out))  # ... and does not block the same command, rerun
    rerun = last_json(capsys.readouterr().out)
    assert code == 0, rerun
    assert rerun["tiles_skipped"] == present
    assert rerun["tiles_computed"] == 136 - present
    assert rerun["tiles_computed"] + rerun["tiles_skipped"] == rerun["tiles_total"] == 136
    after = tile_files(out)
    assert {k: after[k] for k in before} == before  # tiles present before were not rewritten
    assert after == reference["tiles"]
    assert GramLock(open_gram(out)).read() is None
    _report("driver_kill", tiles_before=present, tiles_recomputed=rerun["tiles_computed"],
            tiles_skipped=rerun["tiles_skipped"], second_driver_exit=2)


# -- deleted and flipped tiles --------------------------------------------------------------------------------


def test_deleted_tile_reported_and_exactly_it_recomputed(data, reference, ray_local, tmp_path, capsys):
    out = str(tmp_path / "del.zarr")
    compute_gram(data["data"], parse_arch(ARCH), out, tile=TILE, workers=2, progress=False)
    (Path(out) / "gram" / "c" / "3" / "7").unlink()
    status = gram_status(out)
    assert status["tiles_done"] == 135 and not status["complete"]
    store = open_gram(out)
    assert store.missing_tiles() == [(3, 7)]
    for read in (store.to_numpy, lambda: store.block((48, 64), (112, 128)), lambda: store.block((112, 128), (48, 64))):
        with pytest.raises(KernelscaleError, match=r"tile \(3, 7\) is missing"):
            read()  # never zeros, never NaN: an error naming the tile (also through the mirrored lower half)
    assert main(["verify", out, "--json", "--no-progress"]) == 2
    report = last_json(capsys.readouterr().out)
    assert report["bad"] == [{"tile": [3, 7], "problem": "missing"}]
    assert main(_cli_gram(data["data"], out)) == 0  # the same gram command, rerun
    rerun = last_json(capsys.readouterr().out)
    assert rerun["tiles_computed"] == 1 and rerun["tiles_skipped"] == 135
    assert tile_files(out) == reference["tiles"]
    _report("tile_deleted", tiles_recomputed=rerun["tiles_computed"])


def test_flipped_byte_verify_finds_repair_fixes_bitwise(data, reference, ray_local, tmp_path, capsys):
    out = str(tmp_path / "flip.zarr")
    compute_gram(data["data"], parse_arch(ARCH), out, tile=TILE, workers=2, progress=False)
    # a byte among the values of one tile, the last byte (its stored checksum) of another
    flip_byte(Path(out) / "gram" / "c" / "0" / "5", 0.1)
    flip_byte(Path(out) / "gram" / "c" / "9" / "9", 0.999)
    rerun = compute_gram(data["data"], parse_arch(ARCH), out, progress=False)
    assert rerun["tiles_computed"] == 0  # resume lists chunks; it does not vouch for their contents ...
    assert main(["verify", out, "--json", "--no-progress"]) == 2  # ... verify does
    report = last_json(capsys.readouterr().out)
    assert report["bad"] == [{"tile": [0, 5], "problem": "corrupt"}, {"tile": [9, 9], "problem": "corrupt"}]
    assert main(["verify", out, "--repair", "--json", "--no-progress"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["ok"] and report["repaired"] == 2
    assert tile_files(out) == reference["tiles"]
    _report("byte_flip", tiles_recomputed=report["repaired"])


# -- a full disk ----------------------------------------------------------------------------------------------


@pytest.fixture()
def small_tmpfs(tmp_path):
    yield from Tmpfs.mounted(tmp_path / "tiny", "96k")


def test_disk_full_clear_error_consistent_store_resumes(data, reference, ray_local, small_tmpfs, capsys):
    out = str(small_tmpfs.path / "g.zarr")
    code = main(_cli_gram(data["data"], out))
    captured = capsys.readouterr()
    assert code != 0
    assert "no space left" in captured.err.lower() and "rerun" in captured.err and "Traceback" not in captured.err
    written = count_tiles(out)
    assert 0 < written < 136, written
    # consistent: every chunk that exists is a whole, checksum-valid tile equal to the reference; the rest missing
    stored = tile_files(out)
    assert stored == {k: reference["tiles"][k] for k in stored}
    report = verify_gram(out, progress=False)
    assert {b["problem"] for b in report["bad"]} == {"missing"} and report["tiles_bad"] == 136 - written
    assert GramLock(open_gram(out)).read() is None  # the failed driver released its lock
    small_tmpfs.resize("4m")  # space again
    assert main(_cli_gram(data["data"], out)) == 0
    rerun = last_json(capsys.readouterr().out)
    assert rerun["tiles_skipped"] == written and rerun["tiles_computed"] == 136 - written
    assert tile_files(out) == reference["tiles"]
    _report("disk_full", tiles_before=written, tiles_recomputed=rerun["tiles_computed"])


def _report(name: str, **numbers) -> None:
    """Print the measured figures (pytest -s shows them; docs/reliability.md is written from them by hand)."""
    print(f"RELIABILITY {name} {json.dumps(numbers, sort_keys=True)}")
