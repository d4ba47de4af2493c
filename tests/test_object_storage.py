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
