"""Bad inputs (issue 9): each is refused before any compute, with a message that names the problem, and
nothing is written. (npz NaN/Inf rows, label counts and missing fields are in test_data.py; a Gram store
of other data / kernel / dtype / tile on resume in test_gram_engine.py; a solve on a Gram of other data, a
cross Gram, an asymmetric store, a bad --reg in test_krr.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from kernelscale import compute_gram, parse_arch
from kernelscale.cli import main
from kernelscale.data import ingest, open_dataset
from kernelscale.errors import InputError, StoreError

from fault_helpers import flip_byte, npz_store, synthetic_images
from krr_helpers import pairwise_gram, small_split_with_grams, write_gram

ARCH = "fc:depth=2"


def cli(capsys, *argv: str) -> tuple[int, dict, str]:
    code = main([*argv, "--json", "--no-progress"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.fixture()
def small(tmp_path) -> dict:
    """40 rows of 4x4x1 in 3 classes, their Gram (fc depth 2) and a 12-row test split with its cross Gram."""
    return small_split_with_grams(tmp_path, ARCH)


def _solve_model(capsys, s: dict) -> str:
    model = str(s["root"] / "model.zarr")
    code, summary, _ = cli(capsys, "solve", s["gram"], "--data", s["train"], "--reg", "1e-3", "--solver", "cholesky",
                           "--out", model)
    assert code == 0, summary
    return model


def _tamper_rows(store: str, rows: dict[int, float]) -> None:
    """Write values into rows of a dataset store behind kernelscale's back (checksums stay valid)."""
    x = zarr.open_group(store, mode="r+")["x"]
    for row, value in rows.items():
        block = np.asarray(x[row : row + 1])
        block.reshape(-1)[3] = value
        x[row : row + 1] = block


# -- ingest ---------------------------------------------------------------------------------------------------


def test_ingest_refuses_bad_npz(tmp_path):
    cases = {
        "empty": ({"images": np.zeros((0, 4, 4, 1), np.float32), "labels": np.zeros(0, np.int64)}, "images is empty"),
        "rank5": ({"images": np.zeros((3, 2, 2, 2, 1), np.float32), "labels": np.zeros(3, np.int64)},
                  r"expected shape \(N, H, W, C\)"),
        "labels2d": ({"images": np.zeros((3, 4), np.float32), "labels": np.zeros((3, 1), np.int64)},
                     "labels must be a 1-D array"),
        "negative": ({"images": np.zeros((3, 4), np.float32), "labels": np.array([0, -1, 1])}, "labels must be >= 0"),
        "beyond_names": ({"images": np.zeros((3, 4), np.float32), "labels": np.array([0, 1, 5]),
                          "class_names": np.array(["a", "b"])}, "labels out of range.*largest label is 5"),
    }
    for name, (arrays, match) in cases.items():
        src = tmp_path / f"{name}.npz"
        np.savez(src, **arrays)
        out = tmp_path / f"{name}.zarr"
        with pytest.raises(InputError, match=match):
            ingest(str(src), str(out), progress=False)
        assert not out.exists() and not list(tmp_path.glob(f"{name}.zarr.partial*")), name


# -- gram -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_gram_refuses_tampered_non_finite_rows_before_compute(small, tmp_path, value):
    _tamper_rows(small["train"], {17: value, 30: value})
    out = tmp_path / "g.zarr"
    with pytest.raises(StoreError, match=r"NaN/Inf values \(2 rows.*first: row 17\)"):
        compute_gram(small["train"], parse_arch(ARCH), str(out), tile=16, progress=False)
    assert not out.exists()  # no store, no lock, no tile: refused before Ray was even started


def test_gram_refuses_corrupt_dataset_chunk_and_empty_store(small, tmp_path, capsys):
    data = Path(small["train"])
    flip_byte(next(p for p in sorted((data / "x" / "c").rglob("*")) if p.is_file()), 0.5)
    out = tmp_path / "g.zarr"
    code, summary, err = cli(capsys, "gram", str(data), "--arch", ARCH, "--out", str(out), "--tile", "16")
    assert code == 2 and "corrupt" in summary["error"] and "ingest the data again" in summary["error"]
    assert not out.exists()
    # an empty dataset store (all rows removed behind kernelscale's back)
    empty = small["test"]
    g = zarr.open_group(empty, mode="r+")
    g["x"].resize((0, 4, 4, 1))
    g["labels"].resize((0,))
    code, summary, _ = cli(capsys, "gram", empty, "--arch", ARCH, "--out", str(out), "--tile", "16")
    # its arrays no longer match its recorded row count (issue 16: the layout is checked on open)
    assert code == 2 and "array 'x' has shape (0, 4, 4, 1), expected (12, 4, 4, 1)" in summary["error"]
    assert "ingest the data again" in summary["error"]
    assert not out.exists()


def test_gram_refuses_against_of_another_shape(small, tmp_path, capsys):
    other = npz_store(tmp_path, "other", synthetic_images(10, (5, 5, 1)))
    out = tmp_path / "x.zarr"
    code, summary, _ = cli(capsys, "gram", small["test"], "--against", other, "--arch", ARCH, "--out", str(out))
    assert code == 2 and "(5, 5, 1)" in summary["error"] and "(4, 4, 1)" in summary["error"]
    assert "--resize" in summary["error"] and not out.exists()


def test_gram_refuses_bad_arch_and_options(small, tmp_path, capsys):
    out = tmp_path / "g.zarr"
    for argv, match in (
        (["--arch", "fc:W_std=-1"], "W_std"),
        (["--arch", "transformer"], "transformer"),
        (["--arch", ARCH, "--tile", "0"], "--tile"),
        (["--arch", ARCH, "--workers", "0"], "--workers"),
        (["--arch", ARCH, "--max-tiles", "-2"], "--max-tiles"),
    ):
        code, summary, _ = cli(capsys, "gram", small["train"], "--out", str(out), *argv)
        assert code == 2 and match in summary["error"], (argv, summary)
        assert not out.exists()


# -- solve / eval / curve -------------------------------------------------------------------------------------


def test_solve_refuses_gram_of_a_dataset_with_one_changed_row(small, capsys):
    images = small["images"][:40].copy()
    images[23, 2, 1, 0] += 1e-3
    changed = npz_store(small["root"], "changed", images, small["labels"][:40])
    out = small["root"] / "m.zarr"
    code, summary, _ = cli(capsys, "solve", small["gram"], "--data", changed, "--reg", "1e-3", "--out", str(out))
    assert code == 2 and "other data" in summary["error"] and not out.exists()


def test_eval_refuses_test_store_with_one_changed_row(small, capsys):
    model = _solve_model(capsys, small)
    images = small["images"][40:].copy()
    images[5, 0, 0, 0] -= 1e-3
    changed = npz_store(small["root"], "changed_test", images, small["labels"][40:])
    code, summary, _ = cli(capsys, "eval", model, "--cross", small["cross"], "--test", changed)
    assert code == 2 and "other test rows" in summary["error"]
    assert "accuracy" not in summary


@pytest.mark.parametrize("other_arch", ["fc:depth=2,W_std=2.0", "fc:depth=3", "nngp"])
def test_eval_and_curve_refuse_cross_gram_of_another_kernel(small, capsys, other_arch):
    model = _solve_model(capsys, small)
    spec = parse_arch(ARCH, "nngp").to_json() if other_arch == "nngp" else parse_arch(other_arch).to_json()
    tr, te = open_dataset(small["train"]), open_dataset(small["test"])
    other = str(small["root"] / "other_cross.zarr")
    xtr, xte = tr.rows(0, tr.n), te.rows(0, te.n)
    write_gram(other, pairwise_gram(ARCH, xte, xtr), tile=16, data_fingerprint=te.fingerprint,
               against_fingerprint=tr.fingerprint, spec=spec)
    code, summary, _ = cli(capsys, "eval", model, "--cross", other, "--test", small["test"])
    assert code == 2 and "another kernel" in summary["error"] and "accuracy" not in summary
    code, summary, _ = cli(capsys, "curve", small["gram"], "--data", small["train"], "--cross", other,
                           "--test", small["test"], "--sizes", "10,40")
    assert code == 2 and "another kernel" in summary["error"]


def test_solve_resume_refuses_checkpoint_of_a_gram_of_another_kernel(small, capsys, tmp_path):
    tr = open_dataset(small["train"])
    other = str(tmp_path / "w2.zarr")
    write_gram(other, pairwise_gram("fc:depth=2,W_std=2.0", tr.rows(0, tr.n)), tile=16,
               data_fingerprint=tr.fingerprint, spec=parse_arch("fc:depth=2,W_std=2.0").to_json())
    ckpt = str(tmp_path / "state.npz")
    common = ["--data", small["train"], "--reg", "1e-6", "--tol", "1e-12", "--checkpoint", ckpt, "--checkpoint-every", "1",
              "--precond", "none"]  # no preconditioner: 2 iterations stop short of the tolerance
    code, summary, _ = cli(capsys, "solve", other, *common, "--max-iter", "2", "--out", str(tmp_path / "a.zarr"))
    assert code == 3 and os.path.exists(ckpt)
    out = tmp_path / "b.zarr"
    code, summary, _ = cli(capsys, "solve", small["gram"], *common, "--resume", "--out", str(out))
    assert code == 2 and "another problem" in summary["error"] and not out.exists()


def test_labels_out_of_range_in_a_tampered_store_are_refused(small, capsys):
    lab = zarr.open_group(small["train"], mode="r+")["labels"]
    values = np.asarray(lab[...])
    values[11] = 7  # 3 classes
    lab[...] = values
    out = small["root"] / "m.zarr"
    code, summary, _ = cli(capsys, "solve", small["gram"], "--data", small["train"], "--reg", "1e-3", "--out", str(out))
    assert code == 2 and "labels out of range" in summary["error"] and "row 11 has label 7" in summary["error"]
    assert not out.exists()
