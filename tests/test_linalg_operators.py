"""One conformance suite for every operator: memory, shifted, Zarr (out of core), Ray and the preconditioners
(the operators P^-1), each against the float64 matrix it stands for; then every solver x every Gram backend
against a float64 dense solve."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from kernelscale.errors import StoreError
from kernelscale.gram.operators import RayGramOperator, ZarrGramOperator
from kernelscale.gram.store import open_gram
from kernelscale.linalg import (
    CGOptions,
    DenseOperator,
    JacobiPreconditioner,
    LinearOperator,
    NystromPreconditioner,
    Preconditioner,
    PreconditionerSpec,
    build_preconditioner,
    cg,
    cholesky_solve,
    PrincipalSubmatrix,
    rpcholesky,
)
from kernelscale.storage import delete_chunk
from krr_helpers import spd_matrix, write_gram

N, TILE = 37, 8  # edge tiles are partial
REG = 0.1  # the shift of the shifted operator and the preconditioners' reg
RANK = 6  # Nyström rank

GRAM_BACKENDS = ["memory", "dense64", "shifted", "zarr", "zarr-noprefetch", "ray", "ray-streaming", "principal"]
PRECONDITIONERS = ["precond-none", "precond-jacobi", "precond-nystrom-diag", "precond-nystrom-scalar"]


@dataclass
class Case:
    """An operator under test, the float64 matrix it must equal, and the tolerance of that comparison."""

    op: LinearOperator
    dense: np.ndarray
    tol: float = 1e-12


@pytest.fixture(scope="module")
def kmat() -> np.ndarray:
    return spd_matrix(N, cond=1e2, seed=1).astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, kmat) -> str:
    path = str(tmp_path_factory.mktemp("ops") / "gram.zarr")
    write_gram(path, kmat.astype(np.float32), tile=TILE, dtype="float32")
    return path


def inverse_of_scalar_nystrom(factor: np.ndarray, reg: float) -> np.ndarray:
    """P^-1 for P = (F F^T + reg I) / (lambda_r + reg) on span(F) and I on its complement, from eigh of F F^T."""
    w, q = np.linalg.eigh(factor @ factor.T)
    order = np.argsort(w)[::-1][: factor.shape[1]]
    lam, qr = w[order], q[:, order]
    p = (qr * ((lam + reg) / (lam[-1] + reg))) @ qr.T + (np.eye(len(w)) - qr @ qr.T)
    return np.linalg.inv(p)


def make_case(kind: str, kmat: np.ndarray, store_path: str, request) -> Case:
    """The operator ``kind`` names and its float64 matrix (for preconditioners computed from their definition)."""
    if kind == "memory":
        return Case(DenseOperator(kmat.astype(np.float32), psd=True), kmat)
    if kind == "dense64":
        return Case(DenseOperator(kmat, psd=True), kmat)
    if kind == "shifted":
        return Case(DenseOperator(kmat, psd=True).shift(REG), kmat + REG * np.eye(N))
    if kind.startswith("zarr"):
        return Case(ZarrGramOperator(open_gram(store_path), prefetch=0 if "noprefetch" in kind else 3), kmat)
    if kind == "principal":  # K at scattered rows of a larger store (identity elsewhere), across tile edges
        rows = np.sort(np.random.default_rng(2).choice(N + 11, N, replace=False))
        big = np.eye(N + 11)
        big[np.ix_(rows, rows)] = kmat
        path = str(request.getfixturevalue("tmp_path_factory").mktemp("principal") / "big.zarr")
        write_gram(path, big.astype(np.float32), tile=TILE, dtype="float32")
        return Case(PrincipalSubmatrix(ZarrGramOperator(open_gram(path)), rows), kmat)
    if kind.startswith("ray"):
        request.getfixturevalue("ray_local")
        memory = 0 if kind == "ray-streaming" else 1 << 30
        op = RayGramOperator(open_gram(store_path), workers=2, memory_per_worker=memory)
        assert all(info["in_memory"] == (memory > 0) for info in op.actor_info)
        return Case(op, kmat)
    if kind == "precond-none":
        return Case(Preconditioner(N), np.eye(N))
    if kind == "precond-jacobi":
        return Case(JacobiPreconditioner(np.diag(kmat) + REG), np.diag(1.0 / (np.diag(kmat) + REG)))
    nys = rpcholesky(DenseOperator(kmat, psd=True), RANK, seed=0)
    if kind == "precond-nystrom-diag":
        f = nys.factor
        dense = np.linalg.inv(f @ f.T + np.diag(nys.residual_diag + REG))
        return Case(NystromPreconditioner(nys, REG, "diag"), dense, 1e-9)
    assert kind == "precond-nystrom-scalar"
    return Case(NystromPreconditioner(nys, REG, "scalar"), inverse_of_scalar_nystrom(nys.factor, REG), 1e-9)


@pytest.fixture(scope="module", params=GRAM_BACKENDS + PRECONDITIONERS)
def case(request, kmat, store_path):
    built = make_case(request.param, kmat, store_path, request)
    yield built
    built.op.close()


def test_shape_and_tags(case):
    assert case.op.shape == (N, N)
    assert case.op.symmetric and case.op.psd


def test_mm_and_mv_equal_dense_product(case, rng):
    x = rng.standard_normal((N, 5))
    y = case.op.mm(x)
    assert y.dtype == np.float64 and y.shape == (N, 5)
    np.testing.assert_allclose(y, case.dense @ x, rtol=case.tol, atol=case.tol)
    np.testing.assert_allclose(case.op.mv(x[:, 0]), case.dense @ x[:, 0], rtol=case.tol, atol=case.tol)
    assert case.op.mm(np.zeros((N, 0))).shape == (N, 0)
    with pytest.raises(ValueError):
        case.op.mm(np.zeros((N + 1, 2)))


def test_diag_columns_and_shift_equal_dense(case, rng):
    dense = case.dense
    np.testing.assert_allclose(case.op.diag(), np.diag(dense), rtol=case.tol, atol=case.tol)
    idx = np.array([36, 0, 9, 8, 17, 9])  # unordered, repeated, across tile edges
    np.testing.assert_allclose(case.op.columns(idx), dense[:, idx], rtol=case.tol, atol=case.tol)
    shifted = case.op.shift(0.5)
    x = rng.standard_normal((N, 3))
    np.testing.assert_allclose(shifted.mm(x), dense @ x + 0.5 * x, rtol=case.tol, atol=case.tol)
    np.testing.assert_allclose(shifted.diag(), np.diag(dense) + 0.5, rtol=case.tol, atol=case.tol)
    np.testing.assert_allclose(shifted.columns(idx[:3]), (dense + 0.5 * np.eye(N))[:, idx[:3]], rtol=case.tol,
                               atol=case.tol)
    assert shifted.psd and not case.op.shift(-1.0).psd


@pytest.mark.parametrize("case", PRECONDITIONERS, indirect=True)
def test_preconditioner_apply_equals_its_mm_bitwise(case, rng):
    """What CG calls (``apply``) is the operator this suite checks (``mm``)."""
    r = rng.standard_normal((N, 4))
    np.testing.assert_array_equal(case.op.apply(r), case.op.mm(r))


CG_PRECONDITIONERS = ["none", "jacobi", "nystrom-diag", "nystrom-scalar"]
SOLVE_BACKENDS = ["memory", "dense64", "shifted", "zarr", "ray", "principal"]  # zarr-noprefetch: the same products
DIRECT_BACKENDS = ["memory", "dense64"]  # a direct solve needs the matrix in memory


def solve_problem(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Right-hand sides (N, 3), one duplicated, and the float64 dense solution of (A + REG I) X = B."""
    b = rng.standard_normal((N, 3))
    b[:, 2] = b[:, 0]
    return b, np.linalg.solve(case.dense + REG * np.eye(N), b)


def assert_solved(sol, expected: np.ndarray) -> None:
    assert sol.status == "converged" and sol.converged and sol.fix == "", sol.message
    np.testing.assert_allclose(sol.x, expected, rtol=1e-8, atol=1e-9 * np.abs(expected).max())


# two decorators (not one with indirect=["case"]): only then the backend keeps its module scope, and a Ray
# backend starts its actors once for all preconditioners
@pytest.mark.parametrize("precond", CG_PRECONDITIONERS)
@pytest.mark.parametrize("case", SOLVE_BACKENDS, indirect=True)
def test_cg_with_preconditioner_on_backend_equals_float64_dense_solve(precond, case, rng):
    b, expected = solve_problem(case, rng)
    kind, _, residual = precond.partition("-")
    spec = PreconditionerSpec.parse(f"{kind}:{RANK}" if kind == "nystrom" else kind, residual=residual or "diag")
    pre = build_preconditioner(spec, case.op, REG)
    assert pre.name == kind and pre.shape == (N, N)
    assert_solved(cg(case.op.shift(REG), b, pre, CGOptions(tol=1e-11, max_iter=500)), expected)


@pytest.mark.parametrize("case", DIRECT_BACKENDS, indirect=True)
def test_cholesky_on_dense_backend_equals_float64_dense_solve(case, rng):
    b, expected = solve_problem(case, rng)
    assert_solved(cholesky_solve(case.op.matrix, b, REG), expected)


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
