"""The dependency internals kernelscale uses (kernelscale._compat) are all in the installed zarr and Ray versions."""

import zarr

from kernelscale import _compat, storage


def test_installed_zarr_and_ray_have_every_internal_the_shims_use():
    problems = _compat.missing_internals()
    assert not problems, "\n".join(problems)


def test_chunk_listing_through_the_shim_equals_the_chunks_written(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    array = storage.checksummed_array(group, "a", shape=(4, 4), chunks=(2, 2), dtype="float32", fill_value=0.0)
    array[0:2, 2:4] = 1.0
    array[2:4, 0:2] = 2.0
    assert storage.list_chunks(array) == {(0, 1), (1, 0)}
    assert storage.chunk_exists(array, (0, 1)) and not storage.chunk_exists(array, (0, 0))
    storage.delete_chunk(array, (0, 1))
    assert storage.list_chunks(array) == {(1, 0)}


def test_raw_bytes_written_through_the_shim_read_back_equal(tmp_path):
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    store = group.store_path.store
    _compat.zarr_sync(store.set("k/zarr.json", _compat.zarr_buffer(b'{"x": 1}')))
    assert _compat.zarr_get_bytes(store, "k/zarr.json") == b'{"x": 1}'
    assert _compat.zarr_get_bytes(store, "absent/zarr.json") is None
