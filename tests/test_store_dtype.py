"""Compact dataset stores (``ingest --store-dtype float16|uint8``): what they hold on disk, that every read gives
the float32 model inputs of a float32 store, distinct fingerprints, content checks, and refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from kernelscale.cli import main
from kernelscale.data import ingest, open_dataset
from kernelscale.errors import InputError, StoreError
from kernelscale.kip.targets import TargetSampler


def _npz(tmp_path: Path, n: int = 90, shape: tuple[int, int, int] = (8, 8, 3), float_pixels: bool = False) -> str:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    images = np.clip(rng.normal(90 + 40 * labels[:, None, None, None], 30, (n, *shape)), 0, 255).astype(np.uint8)
    path = tmp_path / ("f.npz" if float_pixels else "u.npz")
    np.savez(path, images=images.astype(np.float32) / 255 if float_pixels else images, labels=labels)
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same 90 uint8 images ingested standardized as float32, float16 and uint8 stores."""
    root = tmp_path_factory.mktemp("dtype")
    src = _npz(root)
    out = {}
    for dtype in ("float32", "float16", "uint8"):
        out[dtype] = str(root / f"{dtype}.zarr")
        ingest(src, out[dtype], preprocess="standardize", store_dtype=dtype, progress=False)
    return out


def _x_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in (Path(path) / "x" / "c").rglob("*") if p.is_file())


def test_stored_dtypes_and_sizes_against_float32(stores):
    sizes = {}
    for dtype, path in stores.items():
        ds = open_dataset(path)
        assert ds.store_dtype == dtype and ds.x.dtype == np.dtype(dtype) and ds.summary()["store_dtype"] == dtype
        sizes[dtype] = _x_bytes(path)
    assert sizes["uint8"] * 3.9 < sizes["float32"] and sizes["float16"] * 1.95 < sizes["float32"]
    raw = open_dataset(stores["uint8"]).stored(0, 90)
    assert raw.dtype == np.uint8 and raw.max() > 200  # the pixels themselves, not preprocessed values


def test_uint8_store_reads_bitwise_equal_to_float32_store(stores):
    f32, u8 = open_dataset(stores["float32"]), open_dataset(stores["uint8"])
    np.testing.assert_array_equal(u8.affine.mean, f32.affine.mean)  # statistics from the same float32 pixels
    np.testing.assert_array_equal(u8.affine.scale, f32.affine.scale)
    a, b = u8.rows(0, u8.n), f32.rows(0, f32.n)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    idx = np.array([57, 3, 88, 3, 20])
    assert np.array_equal(u8.take(idx), f32.take(idx))
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(u8.iter_rows(40), f32.iter_rows(40)))


def test_float16_store_reads_float32_within_half_precision_of_float32_store(stores):
    f32, f16 = open_dataset(stores["float32"]), open_dataset(stores["float16"])
    a, b = f16.rows(0, f16.n), f32.rows(0, f32.n)
    assert a.dtype == np.float32 and not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=2**-11, atol=1e-6)


def test_target_batches_from_uint8_store_equal_float32_store_in_memory_and_by_rows(stores):
    f32, u8 = open_dataset(stores["float32"]), open_dataset(stores["uint8"])
    for limit in (1 << 30, 0):  # in memory, and read row by row from the store
        x1, y1 = TargetSampler(u8, 12, seed=1, memory_limit=limit).batch(3)
        x2, y2 = TargetSampler(f32, 12, seed=1, memory_limit=limit).batch(3)
        assert x1.dtype == np.float32 and np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_fingerprints_differ_between_dtypes_and_float32_keeps_the_previous_fingerprint(stores):
    fps = {dtype: open_dataset(path).fingerprint for dtype, path in stores.items()}
    assert len(set(fps.values())) == 3
    ds = open_dataset(stores["float32"])
    assert "store_dtype" not in ds.attrs  # a float32 store looks like every store written before
    h = hashlib.sha256(json.dumps({"shape": [ds.n, 8, 8, 3], "preprocess": ds.attrs["preprocess"]},
                                  sort_keys=True).encode())
    h.update(ds.affine.digest().encode())
    h.update(np.ascontiguousarray(ds.rows(0, ds.n), np.float32).tobytes())
    h.update(ds.labels.astype(np.int64).tobytes())
    assert fps["float32"] == "sha256:" + h.hexdigest()  # the fingerprint formula of stores without store_dtype


def test_full_content_check_passes_for_each_dtype_and_catches_an_edited_uint8_pixel(tmp_path, stores):
    for path in stores.values():
        open_dataset(path).check_content(full=True)
    src = _npz(tmp_path)
    out = str(tmp_path / "u8.zarr")
    ingest(src, out, store_dtype="uint8", progress=False)
    x = zarr.open_group(out, mode="r+")["x"]
    x[5, 0, 0, 0] = (int(x[5, 0, 0, 0]) + 1) % 256
    with pytest.raises(StoreError, match="differ from what was ingested"):
        open_dataset(out).check_content(full=True)


def test_uint8_refused_for_float_pixels_before_writing(tmp_path):
    src = _npz(tmp_path, float_pixels=True)
    out = tmp_path / "d.zarr"
    with pytest.raises(InputError, match="--store-dtype uint8 keeps 8-bit pixels.*float16 or float32"):
        ingest(src, str(out), store_dtype="uint8", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"]
    with pytest.raises(InputError, match="--store-dtype must be float32, float16, uint8"):
        ingest(src, str(out), store_dtype="int8", progress=False)


def test_float16_refuses_values_beyond_its_range_with_one_line(tmp_path):
    src = tmp_path / "big.npz"
    np.savez(src, images=np.full((4, 2, 2, 1), 1e6, np.float32), labels=np.arange(4) % 2)
    with pytest.raises(InputError, match="exceed float16's range"):
        ingest(str(src), str(tmp_path / "d.zarr"), store_dtype="float16", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npz"]  # the partial store is removed


def test_cli_store_dtype_flag_writes_a_uint8_store_with_its_val_split(tmp_path, capsys):
    src = _npz(tmp_path)
    out, val = str(tmp_path / "t.zarr"), str(tmp_path / "v.zarr")
    code = main(["ingest", src, out, "--store-dtype", "uint8", "--preprocess", "standardize", "--val-fraction", "0.2",
                 "--val-out", val, "--json", "--no-progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["store_dtype"] == "uint8" and summary["val"]["store_dtype"] == "uint8"
    t, v = open_dataset(out), open_dataset(val)
    assert v.x.dtype == np.uint8 and np.array_equal(v.affine.mean, t.affine.mean)
    assert abs(float(t.rows(0, t.n).mean())) < 1e-5  # standardized on read
