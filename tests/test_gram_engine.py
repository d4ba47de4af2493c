"""The distributed Gram engine: tiles equal neural-tangents, edge tiles, cross Grams, resume, fingerprints,
locks, verify/repair and the CLI (issue 3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from kernelscale import compute_gram, open_gram, parse_arch
from kernelscale.cli import main
from kernelscale.data import ingest, open_dataset
from kernelscale.gram.engine import gram_status, verify_gram
from kernelscale.errors import InputError, StoreError
from kernelscale.gram.store import GramLock
from kernelscale.kernels import kernel_fn
from kernelscale.gram.plan import TilePlan, sub_blocks
from kernelscale.gram.store import TileGrid


def _npz_store(root: Path, name: str, images: np.ndarray, labels: np.ndarray | None = None) -> str:
    src = root / f"{name}.npz"
    labels = np.arange(len(images)) % 3 if labels is None else labels
    np.savez(src, images=images.astype(np.float32), labels=labels)
    out = str(root / f"{name}.zarr")
    ingest(str(src), out, progress=False)
    return out


def _direct(spec, x1, x2=None):
    return np.asarray(kernel_fn(spec)(x1, x2, spec.kernel))


def _neural_tangents_reference(spec, x):
    """K(x, x) of an fc spec from neural-tangents' own layers (stax.Dense, stax.Relu) in float64: a reference
    that shares no kernel code with kernelscale (which uses its own ReLU layer, kernels.fast_relu)."""
    import neural_tangents.stax as stax
    from jax.experimental import enable_x64

    assert spec.arch == "fc" and spec.params["activation"] == "relu"
    w, b = spec.params["W_std"], spec.params["b_std"]
    layers = [stax.Flatten()]
    for _ in range(spec.params["depth"]):
        layers += [stax.Dense(512, W_std=w, b_std=b), stax.Relu()]
    _, _, fn = stax.serial(*layers, stax.Dense(1, W_std=w, b_std=b))
    with enable_x64():
        x64 = np.asarray(x, np.float64)
        return np.asarray(fn(x64, x64, spec.kernel), np.float64)


def _chunk_bytes(path: str) -> dict[str, bytes]:
    root = Path(path) / "gram" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- planning (no Ray) -----------------------------------------------------------------------------------------


def test_plan_covers_pending_tiles_once_and_steals():
    grid = TileGrid(1003, 1003, 256, True)
    plan = TilePlan(grid, done={(0, 0), (1, 3)})
    seen, rows = [], [None, None]
    while len(plan):
        for k in range(2):
            t = plan.next(rows[k])
            if t is not None:
                rows[k] = t[0]
                seen.append(t)
    assert sorted(seen) == sorted(t for t in grid if t not in {(0, 0), (1, 3)})
    assert len(seen) == len(set(seen)) == len(grid) - 2


def test_sub_blocks_of_diagonal_tile_are_upper_only():
    assert sub_blocks(10, 10, 4, diagonal=True) == [(0, 0), (0, 4), (0, 8), (4, 4), (4, 8), (8, 8)]
    assert len(sub_blocks(10, 6, 4, diagonal=False)) == 6


# -- correctness against neural-tangents ---------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["ntk", "nngp"])
def test_fc_tiles_equal_neural_tangents(mnist_small, ray_local, tmp_path, kernel):
    spec = parse_arch("fc:depth=2", kernel)
    out = str(tmp_path / "g.zarr")
    summary = compute_gram(mnist_small["train"], spec, out, tile=64, workers=2, progress=False)
    x = open_dataset(mnist_small["train"]).rows(0, 300)
    ref = _neural_tangents_reference(spec, x)
    g = open_gram(out)
    assert g.shape == (300, 300) and g.symmetric
    assert summary["tiles_total"] == 15 == summary["tiles_computed"]
    off = ~np.eye(300, dtype=bool)  # the diagonal (correlation 1) carries float32 arc-cosine error: checked below
    np.testing.assert_allclose(g.to_numpy()[off], ref[off], rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the lower triangle is mirrored from the stored upper triangle, exactly
    lower = g.block((200, 300), (0, 100))
    np.testing.assert_array_equal(lower, g.block((0, 100), (200, 300)).T)
    np.testing.assert_allclose(g.diag(), np.diag(ref), rtol=1e-3)  # arccos near 1: float32-sensitive


def test_convnet_small_images_in_memory_bounded_sub_calls(ray_local, tmp_path, rng):
    images = rng.normal(size=(20, 8, 8, 1))
    data = _npz_store(tmp_path, "conv", images)
    spec = parse_arch("convnet:depth=2", "ntk")
    from kernelscale.kernels import bytes_per_pair, fixed_bytes

    budget = fixed_bytes(spec, (8, 8, 1)) + 16 * bytes_per_pair(spec, (8, 8, 1))  # 4 x 4 pairs per kernel call
    out = str(tmp_path / "g.zarr")
    summary = compute_gram(data, spec, out, tile=8, memory_budget=budget, progress=False)
    assert summary["sub_block"] == 4
    x = open_dataset(data).rows(0, 20)
    ref = _direct(spec, x)
    np.testing.assert_allclose(open_gram(out).to_numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_n1003_tile256_and_float64(ray_local, tmp_path, rng):
    data = _npz_store(tmp_path, "syn", rng.normal(size=(1003, 16)))
    spec = parse_arch("fc", "ntk")
    x = open_dataset(data).rows(0, 1003)
    ref = _direct(spec, x)
    out = str(tmp_path / "g.zarr")
    summary = compute_gram(data, spec, out, tile=256, progress=False)
    assert summary["tiles_total"] == 10 and summary["shape"] == [1003, 1003]
    g = open_gram(out)
    np.testing.assert_allclose(g.to_numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert g.read_tile(3, 3).shape == (1003 - 768, 1003 - 768)
    out64 = str(tmp_path / "g64.zarr")
    compute_gram(data, spec, out64, tile=512, dtype="float64", progress=False)
    g64 = open_gram(out64)
    assert g64.dtype == np.float64
    np.testing.assert_allclose(g64.to_numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cross_gram(mnist_small, ray_local, tmp_path):
    spec = parse_arch("fc:depth=2", "ntk")
    out = str(tmp_path / "cross.zarr")
    summary = compute_gram(mnist_small["val"], spec, out, against=mnist_small["train"], tile=64, progress=False)
    g = open_gram(out)
    assert g.shape == (100, 300) and not g.symmetric
    assert summary["tiles_total"] == 2 * 5
    x1 = open_dataset(mnist_small["val"]).rows(0, 100)
    x2 = open_dataset(mnist_small["train"]).rows(0, 300)
    ref = _direct(spec, x1, x2)
    np.testing.assert_allclose(g.to_numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with pytest.raises(StoreError):
        g.diag()


def test_user_kernel_fn_needs_kernel_id(mnist_small, ray_local, tmp_path):
    def linear(x1, x2, get):
        return x1.reshape(x1.shape[0], -1) @ x2.reshape(x2.shape[0], -1).T

    out = str(tmp_path / "lin.zarr")
    with pytest.raises(InputError, match="kernel_id"):
        compute_gram(mnist_small["val"], linear, out, tile=32, progress=False)
    compute_gram(mnist_small["val"], linear, out, tile=32, kernel_id="linear-v1", progress=False)
    x = open_dataset(mnist_small["val"]).rows(0, 100).reshape(100, -1)
    np.testing.assert_allclose(open_gram(out).to_numpy(), x @ x.T, rtol=1e-4, atol=1e-3)


# -- resume, fingerprints, locks -------------------------------------------------------------------------------


def test_resume_computes_only_missing_tiles_bitwise_identical(mnist_small, ray_local, tmp_path):
    spec = parse_arch("fc:depth=2", "ntk")
    full, part = str(tmp_path / "full.zarr"), str(tmp_path / "part.zarr")
    compute_gram(mnist_small["train"], spec, full, tile=64, progress=False)
    first = compute_gram(mnist_small["train"], spec, part, tile=64, max_tiles=4, progress=False)
    assert first["tiles_computed"] == 4
    assert gram_status(part)["tiles_done"] == 4
    with pytest.raises(StoreError, match="missing"):
        open_gram(part).to_numpy()  # a missing tile never reads as numbers
    second = compute_gram(mnist_small["train"], spec, part, progress=False)  # tile taken from the store
    assert second["tiles_skipped"] == 4 and second["tiles_computed"] == 11
    assert _chunk_bytes(part) == _chunk_bytes(full)
    third = compute_gram(mnist_small["train"], spec, part, progress=False)
    assert third["tiles_computed"] == 0 and third["tiles_skipped"] == 15
    status = gram_status(part)
    assert status["complete"] and status["runs"] == 2 and status["entries_per_s"] > 0


def test_mismatched_fingerprint_refused_before_compute(mnist_small, ray_local, tmp_path, rng):
    images = rng.normal(size=(40, 4, 4, 1))
    data = _npz_store(tmp_path, "a", images)
    changed = images.copy()
    changed[7, 1, 2, 0] += 0.5
    data_changed = _npz_store(tmp_path, "b", changed)
    spec = parse_arch("fc:W_std=1.5", "ntk")
    out = str(tmp_path / "g.zarr")
    compute_gram(data, spec, out, tile=16, progress=False)
    before = _chunk_bytes(out)
    with pytest.raises(StoreError, match="data"):
        compute_gram(data_changed, spec, out, progress=False)
    with pytest.raises(StoreError, match="kernel spec"):
        compute_gram(data, parse_arch("fc:W_std=1.4", "ntk"), out, progress=False)
    with pytest.raises(StoreError, match="kernel spec"):
        compute_gram(data, parse_arch("fc:W_std=1.5", "nngp"), out, progress=False)
    with pytest.raises(StoreError, match="dtype"):
        compute_gram(data, spec, out, dtype="float64", progress=False)
    with pytest.raises(StoreError, match="tile"):
        compute_gram(data, spec, out, tile=8, progress=False)
    assert _chunk_bytes(out) == before
    replaced = compute_gram(data_changed, spec, out, tile=16, overwrite=True, progress=False)
    assert replaced["tiles_computed"] == replaced["tiles_total"] == 6
    assert open_gram(out).attrs["data_fingerprint"] == open_dataset(data_changed).fingerprint


def test_second_driver_refused_stale_lock_ignored(mnist_small, ray_local, tmp_path):
    spec = parse_arch("fc:depth=1", "nngp")
    out = str(tmp_path / "g.zarr")
    compute_gram(mnist_small["val"], spec, out, tile=32, max_tiles=1, progress=False)
    lock = GramLock(open_gram(out, "r+")).acquire()  # a live driver (this process)
    try:
        with pytest.raises(StoreError, match="another kernelscale driver"):
            compute_gram(mnist_small["val"], spec, out, progress=False)
    finally:
        lock.release()
    assert lock.read() is None
    # a crashed driver on this host: dead pid
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = GramLock(open_gram(out, "r+"))
    stale._write({"host": socket.gethostname(), "pid": dead.pid, "token": "x", "started": "then",
                  "heartbeat": time.time()}, exclusive=False)
    assert "dead" in stale.stale_reason(stale.read())
    r = compute_gram(mnist_small["val"], spec, out, max_tiles=2, progress=False)
    assert r["tiles_computed"] == 2 and r["tiles_skipped"] == 1
    # a crashed driver elsewhere: expired heartbeat
    stale._write({"host": "elsewhere", "pid": 1, "token": "y", "started": "then",
                  "heartbeat": time.time() - 3600}, exclusive=False)
    r = compute_gram(mnist_small["val"], spec, out, progress=False)
    assert r["tiles_computed"] == r["tiles_total"] - 3
    assert GramLock(open_gram(out)).read() is None


# -- verify / repair and the CLI -------------------------------------------------------------------------------


def test_cli_gram_status_verify_repair(mnist_small, ray_local, tmp_path, capsys):
    out = str(tmp_path / "g.zarr")
    code = main(["gram", mnist_small["val"], "--arch", "fc:depth=2", "--kernel", "ntk", "--out", out,
                 "--tile", "32", "--workers", "2", "--json", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("tiles_total", "tiles_computed", "tiles_skipped", "seconds", "entries_per_s", "nodes"):
        assert key in summary
    assert summary["tiles_total"] == 10 and sum(summary["nodes"].values()) == 10
    good = open_gram(out).to_numpy()

    assert main(["status", out, "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["tiles_done"] == status["tiles_total"] == 10 and status["eta_seconds"] == 0

    assert main(["verify", out, "--json", "--no-progress"]) == 0
    capsys.readouterr()
    # flip one byte in the middle of a stored tile, delete another
    chunk = Path(out) / "gram" / "c" / "0" / "2"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    (Path(out) / "gram" / "c" / "1" / "3").unlink()
    with pytest.raises(StoreError):
        open_gram(out).to_numpy()
    assert main(["verify", out, "--json", "--no-progress"]) == 2
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {tuple(b["tile"]): b["problem"] for b in report["bad"]} == {(0, 2): "corrupt", (1, 3): "missing"}
    assert main(["verify", out, "--repair", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["repaired"] == 2 and report["ok"]
    np.testing.assert_array_equal(open_gram(out).to_numpy(), good)


def test_verify_detects_asymmetric_diagonal_tile(mnist_small, ray_local, tmp_path):
    out = str(tmp_path / "g.zarr")
    compute_gram(mnist_small["val"], parse_arch("fc:depth=1"), out, tile=50, progress=False)
    store = open_gram(out, "r+")
    tile = store.read_tile(1, 1)
    tile[0, 3] += 1.0
    store.write_tile(1, 1, tile)
    report = verify_gram(out, progress=False)
    assert not report["ok"] and report["bad"] == [{"tile": [1, 1], "problem": "asymmetric"}]


def test_memory_budget_too_small_refused_before_compute(ray_local, tmp_path, rng):
    data = _npz_store(tmp_path, "conv", rng.normal(size=(4, 8, 8, 3)))
    out = str(tmp_path / "g.zarr")
    with pytest.raises(InputError, match="memory budget"):
        compute_gram(data, parse_arch("convnet"), out, memory_budget=1000, progress=False)
    assert not os.path.exists(out)


def test_default_tile_is_balanced_and_bounded():
    from kernelscale.gram.engine import MAX_TILE, default_sub_block, default_tile

    assert default_tile(10_000, 10_000, True) == 2000  # 5 bands of 2000, not 4 x 2048 + 1808
    assert default_tile(1_281_167, 1_281_167, True) == MAX_TILE
    for n in (7, 100, 1003, 5000, 45_000, 90_000, 333_333):
        t = default_tile(n, n, True)
        assert (t % 8 == 0 or t == n) and t <= min(n, MAX_TILE)  # a multiple of 8, or the whole small matrix
        bands = -(-n // t)
        assert bands * t - n < 8 * bands  # padding is only the rounding to a multiple of 8
        assert bands >= 4 or t <= 256
    assert default_sub_block(2000, True) == 1000 and default_sub_block(2000, False) == 2000
    assert default_sub_block(256, True) == 256


def test_lost_tiles_are_recomputed_from_the_listing(mnist_small, ray_local, tmp_path):
    """A tile whose background write died with its actor is missing from the store: the listing check redoes
    exactly those tiles; a tile that stays missing is an error, never a silent hole."""
    from kernelscale.gram.engine import _recompute_lost

    out = str(tmp_path / "g.zarr")
    spec = parse_arch("fc:depth=2", "nngp")
    compute_gram(mnist_small["train"], spec, out, tile=64, workers=1, progress=False)
    store = open_gram(out, "r+")
    reference = store.to_numpy()
    planned = set(store.done_tiles())
    lost = sorted(planned)[1:3]
    for i, j in lost:
        os.remove(os.path.join(out, "gram", "c", str(i), str(j)))
    asked = []

    def rerun(missing):
        asked.append(missing)
        return compute_gram(mnist_small["train"], spec, out, tiles=missing, workers=1, progress=False) | {
            "entries": 0, "seconds": 0.0, "nodes": {}, "tile_seconds": {}}

    run = {"entries": 0, "seconds": 0.0, "nodes": {}, "tile_seconds": {}}
    _recompute_lost(planned, store, run, rerun)
    assert asked == [lost]
    np.testing.assert_array_equal(open_gram(out).to_numpy(), reference)

    with pytest.raises(Exception, match="still missing"):
        _recompute_lost(planned | {(99, 99)}, store, run, lambda missing: run)


@pytest.mark.parametrize("arch, shape", [("fc:depth=3", (6, 6, 3)), ("convnet:depth=2", (8, 8, 2))])
def test_gram_store_equals_float64_neural_tangents_on_and_off_the_diagonal(ray_local, tmp_path, rng, arch, shape):
    """The engine's native calls (compiled CPU tiles, symmetric diagonal blocks): every stored entry, the
    diagonal included, within 1e-5 of max|K| of float64 neural-tangents with stax.Relu."""
    from jax.experimental import enable_x64

    images = rng.normal(size=(30, *shape)) + 0.5  # correlated rows: correlations near 1, as real images
    data = _npz_store(tmp_path, "d", images)
    spec = parse_arch(arch, "ntk")
    out = str(tmp_path / "g.zarr")
    compute_gram(data, spec, out, tile=16, progress=False)
    x = open_dataset(data).rows(0, 30).astype(np.float64)
    with enable_x64():
        ref = np.asarray(kernel_fn(spec, fast=False, native=False)(x, None, "ntk"), np.float64)
    got = open_gram(out).to_numpy().astype(np.float64)
    scale = np.abs(ref).max()
    assert np.abs(np.diag(got) - np.diag(ref)).max() <= 1e-5 * scale
    assert np.abs(got - ref).max() <= 1e-5 * scale
