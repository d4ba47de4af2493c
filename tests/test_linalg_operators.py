"""One conformance suite for all operator backends: memory, Zarr (out of core) and Ray."""

from __future__ import annotations

import numpy as np
import pytest

from kernelscale.errors import StoreError
from kernelscale.gram.store import open_gram
from kernelscale.gram.operators import RayGramOperator, ZarrGramOperator
from kernelscale.linalg import DenseOperator
from kernelscale.storage import delete_chunk
from krr_helpers import spd_matrix, write_gram

N, TILE = 37, 8  # edge tiles are partial


@pytest.fixture(scope="module")
def kmat() -> np.ndarray:
    return spd_matrix(N, cond=1e2, seed=1).astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, kmat) -> str:
    path = str(tmp_path_factory.mktemp("ops") / "gram.zarr")
    write_gram(path, kmat.astype(np.float32), tile=TILE, dtype="float32")
    return path


@pytest.fixture(params=["memory", "zarr", "zarr-noprefetch", "ray", "ray-streaming"])
def operator(request, kmat, store_path):
    kind = request.param
    if kind == "memory":
        op = DenseOperator(kmat.astype(np.float32), psd=True)
    elif kind.startswith("zarr"):
        op = ZarrGramOperator(open_gram(store_path), prefetch=0 if "noprefetch" in kind else 3)
    else:
        request.getfixturevalue("ray_local")
        memory = 0 if kind == "ray-streaming" else 1 << 30
        op = RayGramOperator(open_gram(store_path), workers=2, memory_per_worker=memory)
        assert all(info["in_memory"] == (memory > 0) for info in op.actor_info)
    yield op
    op.close()


def test_shape_and_tags(operator):
    assert operator.shape == (N, N)
    assert operator.symmetric and operator.psd


def test_mm_and_mv_equal_dense_product(operator, kmat, rng):
    x = rng.standard_normal((N, 5))
    y = operator.mm(x)
    assert y.dtype == np.float64 and y.shape == (N, 5)
    np.testing.assert_allclose(y, kmat @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(operator.mv(x[:, 0]), kmat @ x[:, 0], rtol=1e-12, atol=1e-12)
    assert operator.mm(np.zeros((N, 0))).shape == (N, 0)
    with pytest.raises(ValueError):
        operator.mm(np.zeros((N + 1, 2)))


def test_diag_columns_and_shift(operator, kmat, rng):
    np.testing.assert_allclose(operator.diag(), np.diag(kmat), rtol=1e-12)
    idx = np.array([36, 0, 9, 8, 17, 9])  # unordered, repeated, across tile edges
    np.testing.assert_allclose(operator.columns(idx), kmat[:, idx], rtol=1e-12)
    shifted = operator.shift(0.5)
    x = rng.standard_normal((N, 3))
    np.testing.assert_allclose(shifted.mm(x), kmat @ x + 0.5 * x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(shifted.diag(), np.diag(kmat) + 0.5, rtol=1e-12)
    np.testing.assert_allclose(shifted.columns(idx[:3]), (kmat + 0.5 * np.eye(N))[:, idx[:3]], rtol=1e-12)
    assert shifted.psd and not operator.shift(-1.0).psd


def test_rectangular_cross_store(tmp_path, rng):
    a = rng.standard_normal((13, 21))
    store = write_gram(str(tmp_path / "cross.zarr"), a, tile=5, against_fingerprint="sha256:train")
    op = ZarrGramOperator(store)
    assert not op.symmetric and op.shape == (13, 21)
    x = rng.standard_normal((21, 4))
    np.testing.assert_allclose(op.mm(x), a @ x, rtol=1e-12, atol=1e-12)
    op.close()


def test_dense_operator_detects_asymmetry(rng):
    assert not DenseOperator(rng.standard_normal((4, 4))).symmetric


@pytest.mark.parametrize("backend", ["zarr", "ray"])
def test_missing_tile_raises_store_error(tmp_path, kmat, backend, request):
    path = str(tmp_path / "gram.zarr")
    store = write_gram(path, kmat, tile=TILE)
    delete_chunk(store.array, (1, 3))
    if backend == "zarr":
        op = ZarrGramOperator(open_gram(path))
    else:
        request.getfixturevalue("ray_local")
        op = RayGramOperator(open_gram(path), workers=2, memory_per_worker=0)
    with pytest.raises(StoreError, match=r"tile \(1, 3\) is missing"):
        op.mm(np.ones((N, 2)))
    op.close()
