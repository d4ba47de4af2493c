"""Stores whose metadata selects a pickle/object codec (or an object dtype) are refused before anything is
decoded: by `gram` (reading the dataset), `solve` (reading the Gram) and `open_dataset`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kernelscale import compute_gram, parse_arch
from kernelscale.data import open_dataset
from kernelscale.errors import StoreError
from kernelscale.krr import solve


def _poison(store: str, array: str, codec: str = "pickle") -> None:
    """Rewrite ``array``'s zarr.json so its codec chain names a pickle codec (as a hostile store would)."""
    meta_path = Path(store) / array / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [*meta["codecs"], {"name": codec, "configuration": {}}]
    meta_path.write_text(json.dumps(meta))


@pytest.fixture()
def poisoned_data(mnist_small, tmp_path) -> str:
    path = str(tmp_path / "poisoned.zarr")
    shutil.copytree(mnist_small["train"], path)
    _poison(path, "x")
    return path


@pytest.mark.parametrize("codec", ["pickle", "numcodecs.pickle", "vlen-pickle", "object"])
def test_open_dataset_refuses_pickle_codec(mnist_small, tmp_path, codec):
    path = str(tmp_path / "poisoned.zarr")
    shutil.copytree(mnist_small["train"], path)
    _poison(path, "labels", codec)
    with pytest.raises(StoreError, match="can run code"):
        open_dataset(path)


def test_gram_refuses_pickle_codec_before_compute(poisoned_data, tmp_path):
    out = tmp_path / "gram.zarr"
    with pytest.raises(StoreError, match="pickle"):
        compute_gram(poisoned_data, parse_arch("fc"), str(out), progress=False)
    assert not out.exists(), "nothing may be written for a refused input"


def test_solve_refuses_a_gram_with_pickle_codec(mnist_small, ray_local, tmp_path):
    gram = str(tmp_path / "gram.zarr")
    compute_gram(mnist_small["train"], parse_arch("fc"), gram, tile=128, progress=False)
    _poison(gram, "gram")
    with pytest.raises(StoreError, match="pickle"):
        solve(gram, mnist_small["train"], reg=1e-3, out=str(tmp_path / "model.zarr"), progress=False)
    assert not (tmp_path / "model.zarr").exists()


def test_object_dtype_is_refused(mnist_small, tmp_path):
    path = str(tmp_path / "objdtype.zarr")
    shutil.copytree(mnist_small["train"], path)
    meta_path = Path(path) / "labels" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["data_type"] = "object"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError):
        open_dataset(path)
