"""The ImageNet-shaped generator (benchmarks/imagenet_like.py) at small sizes: ImageNet's exact shape of counts,
determinism, resume after a kill, refusal of foreign directories, and classes a kernel can learn (not perfectly)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # spawned workers import it too
import imagenet_like as il  # noqa: E402


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_default_counts_match_imagenet_train_shape():
    counts = il.class_counts(il.IMAGENET_CLASSES, il.IMAGENET_FILES, seed=0)
    assert len(counts) == 1000 and int(counts.sum()) == 1_281_167
    assert int(counts.min()) == 732 and int(counts.max()) == 1300
    names = il.synset_names(1000, seed=0)
    assert len(set(names)) == 1000 and names == sorted(names)
    assert all(len(n) == 9 and n[0] == "n" and n[1:].isdigit() for n in names)


def test_small_folder_layout_and_rerun_writes_nothing(tmp_path):
    out = tmp_path / "inet"
    opts = il.Options(classes=20, total=200)
    first = il.generate(str(out), opts, workers=1)
    assert first["files"] == first["files_written"] == 200 and first["bytes_on_disk"] == first["bytes_written"] > 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 20 and all(len(list(f.glob("*.JPEG"))) == 10 for f in folders)
    with Image.open(next(folders[0].glob("*.JPEG"))) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    before = _files(out)
    again = il.generate(str(out), opts, workers=1)
    assert again["files_written"] == 0 and again["files_skipped"] == 200 and _files(out) == before


def test_killed_run_is_completed_bitwise_like_an_uninterrupted_one(tmp_path):
    opts = il.Options(classes=6, total=36, size=64)
    whole = tmp_path / "whole"
    il.generate(str(whole), opts, workers=1)
    cut = tmp_path / "cut"
    il.generate(str(cut), opts, workers=1)
    victims = sorted(cut.rglob("*.JPEG"))[::5]
    for v in victims:  # files never written, one half-written temporary left by the kill
        v.unlink()
    (victims[0].parent / f"{il.TMP_PREFIX}{victims[0].name}.999").write_bytes(b"\xff\xd8partial")
    done = il.generate(str(cut), opts, workers=2)
    assert done["files_written"] == len(victims)
    assert _files(cut) == _files(whole)
    assert not [p for p in cut.rglob(f"{il.TMP_PREFIX}*")]


def test_refuses_foreign_or_differently_made_directories(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not empty and was not written by imagenet_like"):
        il.generate(str(foreign), il.Options(classes=2, total=4), workers=1)
    assert os.listdir(foreign) == ["holiday.jpg"]
    made = tmp_path / "made"
    il.generate(str(made), il.Options(classes=2, total=4), workers=1)
    with pytest.raises(ValueError, match="other options.*size"):
        il.generate(str(made), il.Options(classes=2, total=4, size=64), workers=1)
    assert il.main([str(foreign), "--classes", "2", "--total", "4", "--workers", "1"]) == 2


def test_classes_are_learnable_but_not_perfectly_by_rbf_kernel_regression(tmp_path):
    from kernelscale.data import ingest, open_dataset

    out = tmp_path / "inet"
    il.generate(str(out), il.Options(classes=20, total=400), workers=1)
    ingest(str(out), str(tmp_path / "d.zarr"), preprocess="standardize", progress=False)  # ingest reads the folder
    ds = open_dataset(str(tmp_path / "d.zarr"))
    x, y = ds.rows(0, ds.n).reshape(ds.n, -1).astype(np.float64), ds.labels
    test = np.zeros(ds.n, bool)
    for c in range(20):
        test[np.flatnonzero(y == c)[:5]] = True
    sq = (x**2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * x @ x.T
    k_all = np.exp(-dist / np.median(dist))
    k, kx = k_all[np.ix_(~test, ~test)], k_all[np.ix_(test, ~test)]
    alpha = np.linalg.solve(k + 1e-3 * np.eye(len(k)), ds.one_hot(np.flatnonzero(~test)))
    accuracy = float(np.mean(np.argmax(kx @ alpha, 1) == y[test]))
    assert 3 / 20 < accuracy < 1.0, accuracy  # chance is 1/20
