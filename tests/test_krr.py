"""Kernel ridge regression end to end through the CLI: solve / eval / curve on stores built from numpy Grams."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kernelscale.cli import main
from kernelscale.data import open_dataset
from kernelscale.gram.store import open_gram
from kernelscale.kernels import parse_arch
from kernelscale.krr import nested_order
from kernelscale.storage import delete_chunk
from krr_helpers import pairwise_gram, write_gram

ARCH = "fc:depth=2"
REG = 1e-3


def run_cli(capsys, *argv: str) -> tuple[int, dict]:
    code = main([*argv, "--json", "--no-progress"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


@pytest.fixture(scope="module")
def stores(mnist_small, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("krr")
    train, val = open_dataset(mnist_small["train"]), open_dataset(mnist_small["val"])
    xtr, xte = train.rows(0, train.n), val.rows(0, val.n)
    spec = parse_arch(ARCH).to_json()
    k = pairwise_gram(ARCH, xtr)
    kx = pairwise_gram(ARCH, xte, xtr)
    gram, cross = str(root / "gram.zarr"), str(root / "cross.zarr")
    write_gram(gram, k.astype(np.float32), tile=64, dtype="float32", data_fingerprint=train.fingerprint, spec=spec)
    write_gram(cross, kx.astype(np.float32), tile=64, dtype="float32", data_fingerprint=val.fingerprint,
               against_fingerprint=train.fingerprint, spec=spec)
    return {"root": root, "train": mnist_small["train"], "test": mnist_small["val"], "gram": gram, "cross": cross,
            "k": k.astype(np.float32).astype(np.float64), "kx": kx.astype(np.float32).astype(np.float64),
            "y": train.one_hot().astype(np.float64), "labels_test": val.labels, "spec": spec}


def reference_alpha(s: dict) -> np.ndarray:
    k = s["k"]
    reg = REG * np.trace(k) / k.shape[0]
    return np.linalg.solve(k + reg * np.eye(k.shape[0]), s["y"])


@pytest.mark.parametrize("precond", ["none", "jacobi", "nystrom:50"])
def test_solve_cg_matches_direct_and_eval(stores, capsys, tmp_path, precond):
    s = stores
    out = str(tmp_path / "model.zarr")
    code, summary = run_cli(capsys, "solve", s["gram"], "--data", s["train"], "--reg", str(REG), "--tol", "1e-8",
                            "--max-iter", "3000", "--precond", precond, "--out", out)
    assert code == 0, summary
    assert summary["status"] == "converged" and summary["rel_residual"] <= 1e-8
    assert {"status", "iterations", "rel_residual", "seconds"} <= set(summary)
    import zarr

    g = zarr.open_group(out, mode="r")
    alpha = np.asarray(g["alpha"][...])
    assert alpha.shape == (300, 10)
    assert g.attrs["gram_fingerprint"] == open_gram(s["gram"]).fingerprint
    assert g.attrs["data_fingerprint"] == open_dataset(s["train"]).fingerprint
    ref = reference_alpha(s)
    np.testing.assert_allclose(alpha, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    code, ev = run_cli(capsys, "eval", out, "--cross", s["cross"], "--test", s["test"])
    assert code == 0, ev
    pred = s["kx"] @ ref
    assert ev["accuracy"] == pytest.approx(np.mean(pred.argmax(1) == s["labels_test"]))
    assert ev["accuracy"] > 0.6  # 300 8x8 MNIST digits
    assert ev["mse"] > 0


def test_cholesky_and_memory_operator_agree(stores, capsys, tmp_path):
    s = stores
    outs = {}
    for name, extra in {"chol": ["--solver", "cholesky"], "mem": ["--operator", "memory", "--precond", "nystrom:40"]}.items():
        outs[name] = str(tmp_path / f"{name}.zarr")
        code, summary = run_cli(capsys, "solve", s["gram"], "--data", s["train"], "--reg", str(REG),
                                "--tol", "1e-9", "--out", outs[name], *extra)
        assert code == 0 and summary["status"] == "converged", summary
    import zarr

    a, b = (np.asarray(zarr.open_group(p, mode="r")["alpha"][...]) for p in outs.values())
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())


def test_ray_operator_solve(stores, capsys, tmp_path, ray_local):
    s = stores
    out = str(tmp_path / "ray.zarr")
    code, summary = run_cli(capsys, "solve", s["gram"], "--data", s["train"], "--reg", str(REG), "--tol", "1e-8",
                            "--operator", "ray", "--workers", "2", "--precond", "nystrom:50", "--out", out)
    assert code == 0 and summary["status"] == "converged", summary
    import zarr

    ref = reference_alpha(s)
    np.testing.assert_allclose(np.asarray(zarr.open_group(out, mode="r")["alpha"][...]), ref, rtol=1e-4,
                               atol=1e-5 * np.abs(ref).max())


def test_not_converged_exits_3_and_writes_nothing(stores, capsys, tmp_path):
    s = stores
    out = str(tmp_path / "m.zarr")
    code, summary = run_cli(capsys, "solve", s["gram"], "--data", s["train"], "--reg", "1e-6", "--tol", "1e-10",
                            "--max-iter", "3", "--out", out)
    assert code == 3
    assert summary["status"] == "max_iterations" and summary["iterations"] == 3
    assert "No model was written" in summary["message"] and "--max-iter" in summary["message"]
    assert not os.path.exists(out)


def test_checkpoint_resume_equals_uninterrupted(stores, capsys, tmp_path):
    s = stores
    common = ["solve", s["gram"], "--data", s["train"], "--reg", "1e-5", "--tol", "1e-8",
              "--precond", "nystrom:20", "--true-residual-every", "5"]
    code, full = run_cli(capsys, *common, "--max-iter", "500", "--out", str(tmp_path / "full.zarr"))
    assert code == 0 and full["iterations"] > 8, full
    ckpt = str(tmp_path / "state.npz")
    code, part = run_cli(capsys, *common, "--max-iter", "7", "--checkpoint", ckpt, "--checkpoint-every", "3",
                         "--out", str(tmp_path / "resumed.zarr"))
    assert code == 3 and os.path.exists(ckpt)
    code, resumed = run_cli(capsys, *common, "--max-iter", "500", "--checkpoint", ckpt, "--resume",
                            "--out", str(tmp_path / "resumed.zarr"))
    assert code == 0 and resumed["iterations"] == full["iterations"]
    import zarr

    a = np.asarray(zarr.open_group(str(tmp_path / "full.zarr"), mode="r")["alpha"][...])
    b = np.asarray(zarr.open_group(str(tmp_path / "resumed.zarr"), mode="r")["alpha"][...])
    np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12 * np.abs(a).max())


def test_refusals_before_compute(stores, capsys, tmp_path):
    s = stores
    out = str(tmp_path / "m.zarr")
    base = ["--data", s["train"], "--reg", str(REG), "--out", out]
    # Gram of other data
    other = str(tmp_path / "other.zarr")
    write_gram(other, s["k"], tile=64, data_fingerprint="sha256:someone-else", spec=s["spec"])
    code, summary = run_cli(capsys, "solve", other, *base)
    assert code == 2 and "other data" in summary["error"]
    # a rectangular cross Gram handed to solve
    code, summary = run_cli(capsys, "solve", s["cross"], *base)
    assert code == 2 and "rectangular" in summary["error"]
    # a square but non-symmetric store
    asym = str(tmp_path / "asym.zarr")
    m = s["k"].copy()
    m[0, 70] += 1.0
    write_gram(asym, m, tile=64, symmetric=False, data_fingerprint=open_dataset(s["train"]).fingerprint, spec=s["spec"])
    code, summary = run_cli(capsys, "solve", asym, *base)
    assert code == 2 and "not symmetric" in summary["error"]
    # negative reg, bad precond, bad reg-scale
    code, summary = run_cli(capsys, "solve", s["gram"], "--data", s["train"], "--reg", "-1", "--out", out)
    assert code == 2 and "--reg" in summary["error"]
    code, summary = run_cli(capsys, "solve", s["gram"], "--data", s["train"], "--reg", "1", "--precond", "ilu", "--out", out)
    assert code == 2 and "--precond" in summary["error"]
    assert not os.path.exists(out)


def test_missing_and_corrupt_tiles_are_refused(stores, capsys, tmp_path):
    s = stores
    fp = open_dataset(s["train"]).fingerprint
    missing = str(tmp_path / "missing.zarr")
    delete_chunk(write_gram(missing, s["k"], tile=64, data_fingerprint=fp, spec=s["spec"]).array, (1, 2))
    code, summary = run_cli(capsys, "solve", missing, "--data", s["train"], "--reg", str(REG), "--out", str(tmp_path / "a"))
    assert code == 2 and "incomplete" in summary["error"]
    corrupt = str(tmp_path / "corrupt.zarr")
    write_gram(corrupt, s["k"], tile=64, data_fingerprint=fp, spec=s["spec"])
    chunk = os.path.join(corrupt, "gram", "c", "1", "3")
    raw = bytearray(open(chunk, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(raw))
    for extra in (["--solver", "cholesky"], ["--precond", "none"]):
        out = str(tmp_path / "b.zarr")
        code, summary = run_cli(capsys, "solve", corrupt, "--data", s["train"], "--reg", str(REG), "--out", out, *extra)
        assert code == 2 and "corrupt" in summary["error"] and "verify" in summary["error"]
        assert not os.path.exists(out)


def test_reg_zero_on_rank_deficient_gram_is_reported(stores, capsys, tmp_path):
    s = stores
    rng = np.random.default_rng(0)
    f = rng.standard_normal((300, 8))
    low = str(tmp_path / "low.zarr")
    write_gram(low, f @ f.T, tile=64, data_fingerprint=open_dataset(s["train"]).fingerprint, spec=s["spec"])
    for extra in (["--solver", "cholesky"], ["--max-iter", "200"]):
        out = str(tmp_path / "m.zarr")
        code, summary = run_cli(capsys, "solve", low, "--data", s["train"], "--reg", "0", "--out", out, *extra)
        assert code == 3, summary
        assert summary["status"] in ("breakdown", "max_iterations") and not os.path.exists(out)
        assert summary["rel_residual"] == summary["rel_residual"]  # not NaN


def test_eval_refuses_mismatched_cross(stores, capsys, tmp_path):
    s = stores
    out = str(tmp_path / "m.zarr")
    assert run_cli(capsys, "solve", s["gram"], "--data", s["train"], "--reg", str(REG), "--solver", "cholesky",
                   "--out", out)[0] == 0
    code, summary = run_cli(capsys, "eval", out, "--cross", s["cross"], "--test", s["train"])
    assert code == 2 and "other test rows" in summary["error"]
    wrong = str(tmp_path / "wrong_cross.zarr")
    write_gram(wrong, s["kx"], tile=64, data_fingerprint=open_dataset(s["test"]).fingerprint,
               against_fingerprint="sha256:other-train", spec=s["spec"])
    code, summary = run_cli(capsys, "eval", out, "--cross", wrong, "--test", s["test"])
    assert code == 2 and "other training data" in summary["error"]


def test_curve_nested_subsets(stores, capsys, tmp_path):
    s = stores
    code, summary = run_cli(capsys, "curve", s["gram"], "--data", s["train"], "--cross", s["cross"], "--test", s["test"],
                            "--sizes", "300,50,100", "--reg", str(REG))
    assert code == 0, summary
    assert summary["sizes"] == [50, 100, 300] and len(summary["accuracy"]) == 3
    # the full size is the whole training set (in another order): same predictions as the full solve
    full = np.mean((s["kx"] @ reference_alpha(s)).argmax(1) == s["labels_test"])
    assert summary["accuracy"][-1] == pytest.approx(full)
    assert summary["accuracy"][0] < summary["accuracy"][-1]
    code, summary = run_cli(capsys, "curve", s["gram"], "--data", s["train"], "--cross", s["cross"], "--test", s["test"],
                            "--sizes", "50,301")
    assert code == 2 and "out of range" in summary["error"]


def test_nested_order_prefixes_are_class_balanced():
    labels = np.repeat(np.arange(4), [30, 25, 40, 5])
    order = nested_order(labels, seed=1)
    assert sorted(order.tolist()) == list(range(100))
    np.testing.assert_array_equal(np.bincount(labels[order[:20]], minlength=4), [5, 5, 5, 5])
    np.testing.assert_array_equal(order, nested_order(labels, seed=1))


def test_end_to_end_with_the_gram_engine(mnist_small, capsys, tmp_path, ray_local):
    """Gram and cross Gram from `kernelscale gram`, then solve and eval through the CLI."""
    train, test = mnist_small["train"], mnist_small["val"]
    gram, cross, model = (str(tmp_path / f) for f in ("g.zarr", "x.zarr", "m.zarr"))
    assert run_cli(capsys, "gram", train, "--arch", ARCH, "--out", gram, "--tile", "128", "--workers", "2")[0] == 0
    assert run_cli(capsys, "gram", test, "--against", train, "--arch", ARCH, "--out", cross, "--tile", "128",
                   "--workers", "2")[0] == 0
    code, summary = run_cli(capsys, "solve", gram, "--data", train, "--reg", str(REG), "--precond", "nystrom:64",
                            "--out", model)
    assert code == 0 and summary["status"] == "converged" and summary["rel_residual"] <= 1e-6, summary
    code, ev = run_cli(capsys, "eval", model, "--cross", cross, "--test", test)
    assert code == 0 and ev["accuracy"] > 0.6, ev
