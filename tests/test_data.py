"""Dataset ingestion: sources, preprocessing, splits, fingerprints and every listed bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from kernelscale.cli import main
from kernelscale.data import Preprocess, ingest, open_dataset
from kernelscale.errors import InputError


def make_folder(root, classes=("cat", "dog"), per_class=6, size=(6, 5), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i:04d}.png")
    return root


def test_mnist5k_builtin(tmp_path):
    s = ingest("mnist5k", str(tmp_path / "m.zarr"), progress=False)
    ds = open_dataset(str(tmp_path / "m.zarr"))
    assert ds.n == 5000 and ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    x = ds.rows(0, 5000)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() == 1.0  # uint8 pixels scaled to [0, 1]
    assert set(s["counts"]) == {str(i) for i in range(10)} and sum(s["counts"].values()) == 5000
    assert s["fingerprint"].startswith("sha256:") and ds.fingerprint == s["fingerprint"]


def test_imagefolder_sorted_rows_and_labels(tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = str(tmp_path / "d.zarr")
    ingest(str(root), out, progress=False)
    ds = open_dataset(out)
    assert ds.class_names == ["cat", "dog"] and list(ds.labels) == [0] * 6 + [1] * 6
    first = np.asarray(Image.open(root / "cat" / "0000.png"), np.float32) / 255
    np.testing.assert_allclose(ds.rows(0, 1)[0], first, atol=1e-6)
    assert ds.input_shape == (6, 5, 3)


def test_npz_float_kept_exactly_and_fingerprint_changes_with_data(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(20, 4, 4, 2)).astype(np.float32)
    labels = np.arange(20) % 3
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    ingest(str(tmp_path / "a.npz"), str(tmp_path / "a.zarr"), progress=False)
    a = open_dataset(str(tmp_path / "a.zarr"))
    np.testing.assert_array_equal(a.rows(0, 20), images)
    images[3, 0, 0, 0] += 1e-3
    np.savez(tmp_path / "b.npz", images=images, labels=labels)
    ingest(str(tmp_path / "b.npz"), str(tmp_path / "b.zarr"), progress=False)
    assert open_dataset(str(tmp_path / "b.zarr")).fingerprint != a.fingerprint
    # deterministic: the same input gives the same fingerprint
    ingest(str(tmp_path / "b.npz"), str(tmp_path / "c.zarr"), progress=False)
    assert open_dataset(str(tmp_path / "c.zarr")).fingerprint == open_dataset(str(tmp_path / "b.zarr")).fingerprint


def test_standardize_stats_and_stats_from_and_val_split(tmp_path):
    train, val = str(tmp_path / "t.zarr"), str(tmp_path / "v.zarr")
    s = ingest("mnist5k", train, limit=1000, val_fraction=0.2, val_out=val, preprocess="standardize", progress=False)
    t, v = open_dataset(train), open_dataset(val)
    assert t.n == 800 and v.n == 200
    assert all(c == 20 for c in s["val"]["counts"].values())  # stratified
    x = t.rows(0, t.n).astype(np.float64)
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    # validation rows use the train statistics
    raw = ingest("mnist5k", str(tmp_path / "raw.zarr"), limit=1000, progress=False)
    assert raw["n"] == 1000
    aff = t.affine
    np.testing.assert_allclose(aff.invert(v.rows(0, 3)), aff.invert(aff.apply(aff.invert(v.rows(0, 3)))), atol=1e-5)
    assert v.attrs["preprocess"]["stats_from"] == t.fingerprint
    # --stats-from on a separate ingest reproduces the same mapping
    ingest("mnist5k", str(tmp_path / "s.zarr"), limit=1000, stats_from=train, progress=False)
    s2 = open_dataset(str(tmp_path / "s.zarr"))
    assert s2.attrs["preprocess"]["kind"] == "standardize"
    np.testing.assert_allclose(s2.affine.mean, aff.mean)


def test_zca_whitens(tmp_path):
    out = str(tmp_path / "z.zarr")
    ingest("mnist5k", out, limit=2000, resize="8x8", preprocess="zca:0.01", progress=False)
    ds = open_dataset(out)
    x = ds.rows(0, ds.n).reshape(ds.n, -1).astype(np.float64)
    cov = np.cov(x, rowvar=False)
    evals = np.linalg.eigvalsh(cov)
    # whitened: eigenvalues s/(s+reg) in (0, 1], the top ones near 1
    assert evals.max() < 1.01 and evals.max() > 0.9
    pix = ds.affine.invert(ds.rows(0, 4))
    assert pix.min() > -1e-3 and pix.max() < 1 + 1e-3  # ZCA is inverted back to pixels


def test_hflip_augment(tmp_path):
    out = str(tmp_path / "f.zarr")
    ingest("mnist5k", out, limit=50, augment="hflip", progress=False)
    ds = open_dataset(out)
    assert ds.n == 100
    np.testing.assert_array_equal(ds.rows(50, 51)[0], ds.rows(0, 1)[0][:, ::-1, :])
    np.testing.assert_array_equal(ds.labels[:50], ds.labels[50:])


# ---- bad input: a clear error naming the file or field, nothing written -----------------------------------


def _refused(tmp_path, src, match, **kw):
    out = tmp_path / "out.zarr"
    with pytest.raises(InputError, match=match):
        ingest(str(src), str(out), progress=False, **kw)
    assert not out.exists(), "nothing may be written on bad input"
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p], "no partial store left behind"


def test_bad_missing_dir(tmp_path):
    _refused(tmp_path, tmp_path / "nope", "not found")


def test_bad_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", "no class subfolders")


def test_bad_class_without_images(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "zebra").mkdir()
    _refused(tmp_path, root, "zebra: class folder has no images")


def test_bad_corrupt_image(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "dog" / "0003.png").write_bytes(b"\x89PNG not really an image")
    _refused(tmp_path, root, r"dog/0003.png: unreadable or corrupt image")


def test_bad_truncated_jpeg_found_during_decode(tmp_path):
    root = make_folder(tmp_path / "imgs")
    good = root / "cat" / "0002.png"
    Image.open(good).save(root / "cat" / "0002.jpg", quality=90)
    data = (root / "cat" / "0002.jpg").read_bytes()
    (root / "cat" / "0002.jpg").write_bytes(data[: len(data) // 2])
    _refused(tmp_path, root, r"cat/0002.jpg: unreadable or corrupt image")


def test_bad_mixed_sizes_without_resize(tmp_path):
    root = make_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "dog" / "0099.png")
    _refused(tmp_path, root, r"dog/0099.png: image is 9x9 .* mixed image sizes need --resize")
    ingest(str(root), str(tmp_path / "ok.zarr"), resize="6x5", progress=False)  # and --resize fixes it
    assert open_dataset(str(tmp_path / "ok.zarr")).n == 13


def test_bad_npz_nan(tmp_path):
    images = np.zeros((5, 2, 2, 1), np.float32)
    images[2, 1, 1, 0] = np.nan
    np.savez(tmp_path / "n.npz", images=images, labels=np.arange(5))
    _refused(tmp_path, tmp_path / "n.npz", r"images has NaN/Inf values in 1 rows \(first: row 2\)")


def test_bad_npz_inf(tmp_path):
    images = np.zeros((5, 2, 2, 1), np.float32)
    images[4, 0, 0, 0] = np.inf
    np.savez(tmp_path / "n.npz", images=images, labels=np.arange(5))
    _refused(tmp_path, tmp_path / "n.npz", r"NaN/Inf values .* row 4")


def test_bad_label_count(tmp_path):
    np.savez(tmp_path / "l.npz", images=np.zeros((5, 2, 2, 1), np.uint8), labels=np.arange(4))
    _refused(tmp_path, tmp_path / "l.npz", r"labels: 4 labels for 5 images")


def test_bad_npz_missing_field(tmp_path):
    np.savez(tmp_path / "m.npz", pics=np.zeros((5, 2, 2, 1), np.uint8), labels=np.arange(5))
    _refused(tmp_path, tmp_path / "m.npz", r"missing array 'images'")


def test_out_exists_needs_overwrite(tmp_path):
    out = tmp_path / "out.zarr"
    ingest("mnist5k", str(out), limit=20, progress=False)
    before = open_dataset(str(out)).fingerprint
    with pytest.raises(InputError, match="already exists; pass overwrite=True"):  # the API's words, not the CLI's
        ingest("mnist5k", str(out), limit=30, progress=False)
    assert open_dataset(str(out)).fingerprint == before
    ingest("mnist5k", str(out), limit=30, overwrite=True, progress=False)
    assert open_dataset(str(out)).n == 30


@pytest.mark.parametrize("kw, match", [
    ({"preprocess": "pca"}, "--preprocess must be"),
    ({"preprocess": "zca:-1"}, "must be > 0"),
    ({"val_fraction": 0.2}, "--val-fraction needs --val-out"),
    ({"resize": "32"}, "--resize must be HxW"),
    ({"limit": 0}, "--limit must be >= 1"),
])
def test_bad_options(tmp_path, kw, match):
    _refused(tmp_path, "mnist5k", match, **kw)


def test_cli_ingest_json_and_exit_codes(tmp_path, capsys):
    out = str(tmp_path / "c.zarr")
    assert main(["ingest", "mnist5k", out, "--limit", "30", "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 30 and summary["fingerprint"].startswith("sha256:")
    assert main(["ingest", "mnist5k", out, "--json"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err
    assert main(["ingest"]) == 2
    assert main(["--help"]) == 0


def test_preprocess_parse():
    assert Preprocess.parse("zca").strength == 0.1
    assert Preprocess.parse("zca:0.5").strength == 0.5


@pytest.mark.cifar
def test_cifar10_full_ingest(cifar_dir, tmp_path):
    train, val = str(tmp_path / "c.zarr"), str(tmp_path / "cv.zarr")
    s = ingest(str(cifar_dir), train, val_fraction=0.1, val_out=val, preprocess="standardize", progress=False)
    assert s["n"] == 45000 and s["val"]["n"] == 5000
    assert s["input_shape"] == [32, 32, 3] and len(s["counts"]) == 10
    assert all(v == 4500 for v in s["counts"].values())
    ds = open_dataset(train)
    assert ds.class_names[0] == "airplane" and ds.x.chunks[0] < ds.n  # chunked by rows
    assert np.isfinite(ds.rows(0, 100)).all()
