"""Stores on object storage: a real S3-compatible server on 127.0.0.1 (moto), credentials from the env."""

import logging

import numpy as np

from kernelscale.data import ingest, open_dataset


def test_ingest_to_s3_matches_local(s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"{s3_bucket}/mnist/train.zarr"
    remote = ingest("mnist5k", url, limit=60, preprocess="standardize", progress=False)
    local = ingest("mnist5k", str(tmp_path / "train.zarr"), limit=60, preprocess="standardize", progress=False)
    assert remote["fingerprint"] == local["fingerprint"]
    ds = open_dataset(url)
    np.testing.assert_array_equal(ds.rows(0, 60), open_dataset(str(tmp_path / "train.zarr")).rows(0, 60))
    secret = "kernelscale-test-secret"
    assert secret not in caplog.text, "credentials must never be logged"


# ---- every store on S3: Gram compute, resume, solve, eval, distill ------------------------------------------
SECRET = "kernelscale-test-secret"


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, "credentials must never be logged or printed"


def test_gram_solve_eval_on_s3_match_local(s3_bucket, mnist_small, ray_local, tmp_path, caplog, capsys):
    """Data, Gram, cross Gram and model all on s3://: same numbers as the local run, resume computes nothing."""
    from kernelscale import compute_gram, parse_arch
    from kernelscale.gram.store import open_gram
    from kernelscale.krr import evaluate, solve

    caplog.set_level(logging.DEBUG)
    base = f"{s3_bucket}/pipeline"
    train_url, val_url = f"{base}/train.zarr", f"{base}/val.zarr"
    # copy the local fixture stores to s3 through ingest's own npz path (same rows, same fingerprints)
    local_train, local_val = open_dataset(mnist_small["train"]), open_dataset(mnist_small["val"])
    for ds, url, name in ((local_train, train_url, "train"), (local_val, val_url, "val")):
        npz = tmp_path / f"{name}.npz"
        np.savez(npz, images=ds.rows(0, ds.n), labels=ds.labels)
        ingest(str(npz), url, progress=False)
    spec = parse_arch("fc:depth=2", "ntk")
    gram_url, cross_url = f"{base}/gram.zarr", f"{base}/cross.zarr"
    first = compute_gram(train_url, spec, gram_url, tile=128, workers=2, progress=False)
    assert first["tiles_computed"] == first["tiles_total"] == 6
    again = compute_gram(train_url, spec, gram_url, tile=128, workers=2, progress=False)
    assert again["tiles_computed"] == 0 and again["tiles_skipped"] == 6

    local_gram = str(tmp_path / "gram.zarr")
    local_train_s = str(tmp_path / "train.zarr")
    ingest(str(tmp_path / "train.npz"), local_train_s, progress=False)
    compute_gram(local_train_s, spec, local_gram, tile=128, workers=2, progress=False)
    np.testing.assert_array_equal(open_gram(gram_url).to_numpy(), open_gram(local_gram).to_numpy())

    compute_gram(val_url, spec, cross_url, against=train_url, tile=128, workers=2, progress=False)
    model_url = f"{base}/model.zarr"
    solved = solve(gram_url, train_url, reg=1e-3, out=model_url, tol=1e-8, progress=False)
    assert solved["status"] == "converged" and solved["out"] == model_url
    local_model = str(tmp_path / "model.zarr")
    solve(local_gram, local_train_s, reg=1e-3, out=local_model, tol=1e-8, progress=False)
    remote_eval = evaluate(model_url, cross_url, val_url)
    assert remote_eval["n_test"] == 100 and 0.5 < remote_eval["accuracy"] <= 1.0
    local_cross = str(tmp_path / "cross.zarr")
    local_val_s = str(tmp_path / "val.zarr")
    ingest(str(tmp_path / "val.npz"), local_val_s, progress=False)
    compute_gram(local_val_s, spec, local_cross, against=local_train_s, tile=128, workers=2, progress=False)
    assert evaluate(local_model, local_cross, local_val_s)["accuracy"] == remote_eval["accuracy"]
    out = capsys.readouterr()
    _no_secret(caplog.text, out.out, out.err)


def _last_json(stdout: str) -> dict:
    import json

    # the summary line; Ray may forward worker/raylet log lines to the driver's stdout after it (reported)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary on stdout: {stdout[-1500:]!r}"
    return json.loads(lines[-1])


def test_cli_gram_resume_on_s3_prints_no_secret(s3_bucket, mnist_small, tmp_path):
    """The CLI in a subprocess (its own local Ray, env credentials): rerun of a finished Gram computes nothing."""
    import json
    import os
    import subprocess
    import sys

    ds = open_dataset(mnist_small["train"])
    npz = tmp_path / "rows.npz"
    np.savez(npz, images=ds.rows(0, 120), labels=ds.labels[:120])
    data_url, gram_url = f"{s3_bucket}/cli/rows.zarr", f"{s3_bucket}/cli/gram.zarr"
    ingest(str(npz), data_url, progress=False)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "kernelscale.cli", "gram", data_url, "--arch", "fc", "--out", gram_url,
           "--tile", "64", "--workers", "1", "--json", "-vv", "--no-progress"]
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
        _no_secret(r.stdout, r.stderr)
    first, second = (_last_json(r.stdout) for r in runs)
    assert first["tiles_computed"] == 3 and second["tiles_computed"] == 0 and second["tiles_skipped"] == 3


def test_distill_and_evaluate_on_s3(s3_bucket, mnist_small, caplog):
    from kernelscale.kip.store import open_distilled
    from kernelscale.kip.run import distill, evaluate

    caplog.set_level(logging.DEBUG)
    out = f"{s3_bucket}/kip/distilled.zarr"
    summary = distill(mnist_small["train"], out=out, arch="fc", ipc=2, steps=4, target_batch=64, checkpoint_every=2,
                      progress=False)
    assert summary["status"] == "ok" and summary["steps_done"] == 4
    resumed = distill(mnist_small["train"], out=out, arch="fc", ipc=2, steps=6, target_batch=64, checkpoint_every=2,
                      resume=True, progress=False)
    assert resumed["start_step"] == 4 and resumed["steps_done"] == 6
    x, labels = open_distilled(out).support()
    assert x.shape[0] == 20 and np.isfinite(x).all()
    ev = evaluate(out, mnist_small["val"])
    assert 0.0 <= ev["accuracy"] <= 1.0
    _no_secret(caplog.text)
