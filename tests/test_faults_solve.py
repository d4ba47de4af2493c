"""Faults injected into `kernelscale solve` / `eval` / `curve` (issue 9): a solve SIGKILLed and resumed from its
checkpoint, corrupt / missing / non-finite tiles in the stores they read, a corrupt model, and numerical
failures (indefinite or singular operators, duplicated right-hand sides) reported with an explicit status.
(test_krr.py covers: corrupt/missing train Gram refused by cholesky and cg-zarr solves, reg 0 on a
rank-deficient Gram, a not-converged solve writing nothing, a resume without a kill.)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from kernelscale.cli import main
from kernelscale.data import open_dataset
from kernelscale.gram.store import open_gram
from kernelscale.kernels import parse_arch

from fault_helpers import flip_byte, npz_store, sigkill, start_cli, synthetic_images, wait_for
from krr_helpers import pairwise_gram, spd_matrix, write_gram

ARCH = "fc:depth=2"


def cli(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main([*argv, "--json", "--no-progress"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def alpha_of(model: str) -> np.ndarray:
    return np.asarray(zarr.open_group(model, mode="r")["alpha"][...])


@pytest.fixture(scope="module")
def krr(mnist_small, tmp_path_factory) -> dict:
    """Train Gram (tile 32), cross Gram and a converged model of mnist_small; each test copies what it breaks."""
    root = tmp_path_factory.mktemp("faults_solve")
    train, val = open_dataset(mnist_small["train"]), open_dataset(mnist_small["val"])
    spec = parse_arch(ARCH).to_json()
    xtr, xte = train.rows(0, train.n), val.rows(0, val.n)
    gram, cross = str(root / "gram.zarr"), str(root / "cross.zarr")
    k = pairwise_gram(ARCH, xtr)
    write_gram(gram, (0.5 * (k + k.T)).astype(np.float32), tile=32, dtype="float32",  # exactly symmetric
               data_fingerprint=train.fingerprint, spec=spec)
    write_gram(cross, pairwise_gram(ARCH, xte, xtr).astype(np.float32), tile=32, dtype="float32",
               data_fingerprint=val.fingerprint, against_fingerprint=train.fingerprint, spec=spec)
    model = str(root / "model.zarr")
    assert main(["solve", gram, "--data", mnist_small["train"], "--reg", "1e-3", "--solver", "cholesky",
                 "--out", model, "--no-progress"]) == 0
    return {"root": root, "train": mnist_small["train"], "test": mnist_small["val"], "gram": gram, "cross": cross,
            "model": model, "spec": spec, "fp": train.fingerprint}


def _copy(src: str, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


# -- a solve killed and resumed ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_solve_sigkilled_then_resumed_equals_uninterrupted(krr, capsys, tmp_path):
    # a slowly converging system (condition 1e3, streamed from its store): a few hundred iterations, seconds
    slow = str(tmp_path / "slow.zarr")
    write_gram(slow, spd_matrix(300, cond=1e3, seed=4), tile=64, data_fingerprint=krr["fp"], spec=krr["spec"])
    common = ["solve", slow, "--data", krr["train"], "--reg", "0", "--tol", "1e-9", "--max-iter", "3000",
              "--true-residual-every", "7"]
    code, full, _ = cli(capsys, *common, "--out", str(tmp_path / "full.zarr"))
    assert code == 0 and full["status"] == "converged" and full["iterations"] > 50, full

    ckpt = tmp_path / "state.npz"
    resumed_out = str(tmp_path / "resumed.zarr")
    args = [*common, "--checkpoint", str(ckpt), "--checkpoint-every", "5", "--out", resumed_out, "--no-progress"]
    proc = start_cli(*args, log_path=tmp_path / "killed.log")
    try:
        first = wait_for(lambda: ckpt.exists() and ckpt.stat().st_mtime_ns, 120, "the first checkpoint")
        wait_for(lambda: not ckpt.exists() or ckpt.stat().st_mtime_ns != first, 120, "a later checkpoint")
        assert proc.poll() is None, "the solve finished before it could be killed"
        sigkill(proc)
    finally:
        sigkill(proc)
    assert proc.returncode == -9 and not os.path.exists(resumed_out)  # killed: no model
    saved_at = int(np.load(ckpt)["iteration"])
    assert 0 < saved_at < full["iterations"]
    code, resumed, _ = cli(capsys, *common, "--checkpoint", str(ckpt), "--resume", "--out", resumed_out)
    assert code == 0 and resumed["status"] == "converged", resumed
    assert resumed["iterations"] == full["iterations"]
    a, b = alpha_of(str(tmp_path / "full.zarr")), alpha_of(resumed_out)
    np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12 * np.abs(a).max())
    print(f"RELIABILITY solve_kill {json.dumps({'iterations': full['iterations'], 'checkpoint_iteration': saved_at})}")


# -- corrupt, missing and non-finite stores -----------------------------------------------------------------------


def test_eval_and_curve_refuse_corrupt_or_incomplete_cross(krr, capsys, tmp_path):
    corrupt = _copy(krr["cross"], tmp_path / "corrupt.zarr")
    flip_byte(Path(corrupt) / "gram" / "c" / "1" / "4", 0.3)
    code, summary, _ = cli(capsys, "eval", krr["model"], "--cross", corrupt, "--test", krr["test"])
    assert code == 2 and "tile (1, 4) is corrupt" in summary["error"] and "verify" in summary["error"]
    assert "accuracy" not in summary
    code, summary, _ = cli(capsys, "curve", krr["gram"], "--data", krr["train"], "--cross", corrupt,
                           "--test", krr["test"], "--sizes", "100,300")
    assert code == 2 and "corrupt" in summary["error"] and "accuracy" not in summary
    missing = _copy(krr["cross"], tmp_path / "missing.zarr")
    (Path(missing) / "gram" / "c" / "2" / "7").unlink()
    code, summary, _ = cli(capsys, "eval", krr["model"], "--cross", missing, "--test", krr["test"])
    assert code == 2 and "incomplete" in summary["error"] and "rerun `kernelscale gram`" in summary["error"]


def test_corrupt_model_refused(krr, capsys, tmp_path):
    model = _copy(krr["model"], tmp_path / "model.zarr")
    chunk = next(p for p in sorted((Path(model) / "alpha" / "c").rglob("*")) if p.is_file())
    flip_byte(chunk, 0.5)
    code, summary, _ = cli(capsys, "eval", model, "--cross", krr["cross"], "--test", krr["test"])
    assert code == 2 and "alpha is corrupt" in summary["error"] and "accuracy" not in summary
    # a model cut short before `complete` was written
    cut = _copy(krr["model"], tmp_path / "cut.zarr")
    g = zarr.open_group(cut, mode="r+")
    g.attrs["complete"] = False
    code, summary, _ = cli(capsys, "eval", cut, "--cross", krr["cross"], "--test", krr["test"])
    assert code == 2 and "incomplete" in summary["error"]


def test_solve_memory_and_ray_operators_refuse_corrupt_gram(krr, capsys, tmp_path, ray_local):
    corrupt = _copy(krr["gram"], tmp_path / "corrupt.zarr")
    flip_byte(Path(corrupt) / "gram" / "c" / "3" / "6", 0.6)
    for extra in (["--operator", "memory"], ["--operator", "ray", "--workers", "2"]):
        out = tmp_path / "m.zarr"
        code, summary, err = cli(capsys, "solve", corrupt, "--data", krr["train"], "--reg", "1e-3", "--out", str(out),
                                 *extra)
        assert code == 2, (extra, summary)
        assert "tile (3, 6) is corrupt" in summary["error"] and "verify" in summary["error"], extra
        assert "Traceback" not in err and not out.exists()


def test_non_finite_tile_written_behind_our_back_is_found_and_refused(krr, capsys, tmp_path):
    bad = _copy(krr["gram"], tmp_path / "inf.zarr")
    store = open_gram(bad, "r+")
    r0, r1, c0, c1 = store.grid.bounds(2, 5)
    block = np.asarray(store.array[r0:r1, c0:c1])
    block[4, 9] = np.inf
    store.array[r0:r1, c0:c1] = block  # bypasses write_tile's own refusal; the checksum is valid
    code, summary, _ = cli(capsys, "verify", bad)
    assert code == 2 and summary["bad"] == [{"tile": [2, 5], "problem": "non-finite"}]
    out = tmp_path / "m.zarr"
    for extra in (["--solver", "cholesky"], []):
        code, summary, _ = cli(capsys, "solve", bad, "--data", krr["train"], "--reg", "1e-3", "--out", str(out), *extra)
        assert code == 2 and "tile (2, 5) is non-finite" in summary["error"] and not out.exists()


# -- numerical failures at the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_indefinite_gram_reg0_explicit_status_no_nan_no_model(krr, capsys, tmp_path, solver):
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    m = (q * np.linspace(-1, 2, 300)) @ q.T
    m = 0.5 * (m + m.T)
    indefinite = str(tmp_path / "indef.zarr")
    write_gram(indefinite, m, tile=64, data_fingerprint=krr["fp"], spec=krr["spec"])
    out = tmp_path / "m.zarr"
    code, summary, err = cli(capsys, "solve", indefinite, "--data", krr["train"], "--reg", "0", "--solver", solver,
                             "--max-iter", "300", "--out", str(out))
    assert code == 3, summary
    assert summary["status"] in ("breakdown", "max_iterations") and summary["out"] is None
    # non-finite residuals are reported as JSON null (strict JSON), never as a NaN passing for a number
    assert summary["rel_residual"] is None or not math.isnan(summary["rel_residual"])
    assert "No model was written" in summary["message"]
    assert not out.exists()


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_duplicated_right_hand_sides_from_absent_classes(tmp_path, capsys, solver):
    """Classes 3 and 4 have no rows: their target columns are identical (-1/5 everywhere)."""
    images = synthetic_images(60, seed=8)
    labels = np.arange(60) % 3
    src = tmp_path / "d.npz"
    np.savez(src, images=images, labels=labels, class_names=np.array(["a", "b", "c", "d", "e"]))
    from kernelscale.data import ingest

    data = str(tmp_path / "d.zarr")
    ingest(str(src), data, progress=False)
    ds = open_dataset(data)
    assert ds.num_classes == 5
    gram = str(tmp_path / "g.zarr")
    write_gram(gram, pairwise_gram(ARCH, ds.rows(0, 60)), tile=16, data_fingerprint=ds.fingerprint,
               spec=parse_arch(ARCH).to_json())
    out = str(tmp_path / "m.zarr")
    code, summary, _ = cli(capsys, "solve", gram, "--data", data, "--reg", "1e-3", "--tol", "1e-8",
                           "--solver", solver, "--out", out)
    assert code == 0 and summary["status"] == "converged", summary
    alpha = alpha_of(out)
    assert np.isfinite(alpha).all()
    if solver == "cg":  # block CG deflates the duplicate: the same column, bit for bit
        np.testing.assert_array_equal(alpha[:, 3], alpha[:, 4])
    else:  # LAPACK blocks the right-hand sides: equal to rounding
        np.testing.assert_allclose(alpha[:, 3], alpha[:, 4], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(alpha[:, :3].sum(1) + alpha[:, 3] + alpha[:, 4], 0, atol=1e-6 * np.abs(alpha).max())


@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_reg0_on_duplicated_inputs_with_other_labels_is_not_success(capsys, tmp_path, solver):
    """A Gram with two identical rows (one input twice, two labels) and reg 0: singular and inconsistent."""
    images = synthetic_images(40, seed=2)
    images[7] = images[3]
    labels = np.arange(40) % 2
    labels[7] = 1 - labels[3]  # the same input with two labels: no exact solution
    data = npz_store(tmp_path, "dup", images, labels)
    ds = open_dataset(data)
    k = pairwise_gram(ARCH, ds.rows(0, 40))
    gram = str(tmp_path / "g.zarr")
    write_gram(gram, k, tile=16, data_fingerprint=ds.fingerprint, spec=parse_arch(ARCH).to_json())
    code, summary, _ = cli(capsys, "solve", gram, "--data", data, "--reg", "0", "--max-iter", "200",
                           "--solver", solver, "--out", str(tmp_path / "m.zarr"))
    assert code == 3 and summary["status"] != "converged" and not os.path.exists(tmp_path / "m.zarr")
    assert summary["rel_residual"] is None or not math.isnan(summary["rel_residual"])
