"""Block PCG: agreement with Cholesky, dependent right-hand sides, honest failure statuses, checkpoints,
preconditioners (Jacobi, Nyström uniform / RPCholesky) on an ill-conditioned kernel."""

from __future__ import annotations

import numpy as np
import pytest

from kernelscale.errors import InputError
from kernelscale.linalg import (
    CGOptions,
    DenseOperator,
    PreconditionerSpec,
    build_preconditioner,
    cg,
    cg_done,
    cg_finish,
    cg_init,
    cg_step,
    cholesky_solve,
    nystrom_uniform,
    rpcholesky,
)
from kernelscale.krr.config import SOLVE_FLAG_NAMES
from kernelscale.linalg.cg import API_NAMES
from krr_helpers import spd_matrix


def rbf(n: int, lengthscale: float, seed: int = 0, dim: int = 3) -> np.ndarray:
    """An ill-conditioned kernel with a fast-decaying spectrum (Gaussian RBF on random points)."""
    x = np.random.default_rng(seed).standard_normal((n, dim))
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * lengthscale**2))
    return 0.5 * (k + k.T)


def test_spd_multiple_rhs_matches_cholesky(rng):
    k = spd_matrix(120, cond=1e4)
    b = rng.standard_normal((120, 4))
    sol = cg(DenseOperator(k, psd=True), b, options=CGOptions(tol=1e-10, max_iter=2000))
    ref = cholesky_solve(k, b)
    assert sol.status == "converged" and ref.status == "converged"
    assert sol.max_rel_residual <= 1e-10
    np.testing.assert_allclose(sol.x, ref.x, rtol=1e-6, atol=1e-8 * np.abs(ref.x).max())
    np.testing.assert_allclose(np.linalg.norm(b - k @ sol.x, axis=0) / np.linalg.norm(b, axis=0), sol.rel_residual,
                               rtol=1e-2)
    assert sol.history and sol.seconds > 0 and sol.iterations == len(sol.history)


def test_vector_rhs_and_float32_operator(rng):
    k = spd_matrix(60, cond=1e2)
    b = rng.standard_normal(60)
    sol = cg(DenseOperator(k.astype(np.float32), psd=True), b, options=CGOptions(tol=1e-9))
    assert sol.converged and sol.x.shape == (60,) and sol.x.dtype == np.float64
    np.testing.assert_allclose(k.astype(np.float32).astype(np.float64) @ sol.x, b, rtol=0, atol=1e-7 * np.abs(b).max())


def test_duplicated_dependent_and_zero_columns(rng):
    k = spd_matrix(80, cond=1e3)
    b0 = rng.standard_normal(80)
    b1 = rng.standard_normal(80)
    b = np.stack([b0, b0, 2 * b0 - 3 * b1, b1, np.zeros(80), -b0], axis=1)
    sol = cg(DenseOperator(k, psd=True), b, options=CGOptions(tol=1e-8, max_iter=1000))
    assert sol.status == "converged"
    assert np.isfinite(sol.x).all() and sol.column_status == ["converged"] * 6
    np.testing.assert_array_equal(sol.x[:, 0], sol.x[:, 1])
    np.testing.assert_array_equal(sol.x[:, 4], 0.0)
    np.testing.assert_allclose(sol.x[:, 5], -sol.x[:, 0], rtol=1e-12)


def test_indefinite_operator_reports_breakdown_not_nan(rng):
    q, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    k = (q * np.linspace(-1, 1, 50)) @ q.T  # indefinite; eigenvalue 0 excluded by even count
    k = 0.5 * (k + k.T)
    sol = cg(DenseOperator(k), rng.standard_normal((50, 3)), options=CGOptions(tol=1e-10, max_iter=500))
    assert sol.status in ("breakdown", "max_iterations") and not sol.converged
    assert np.isfinite(sol.x).all() and np.isfinite(sol.rel_residual).all()
    assert "try" in sol.message.lower() or "use" in sol.message.lower()


def test_singular_operator_inconsistent_rhs_is_not_success(rng):
    f = rng.standard_normal((40, 5))
    k = f @ f.T  # rank 5, reg 0
    b = rng.standard_normal((40, 2))  # not in the range of K
    sol = cg(DenseOperator(k, psd=True), b, options=CGOptions(tol=1e-8, max_iter=200))
    assert sol.status in ("breakdown", "max_iterations")
    assert np.isfinite(sol.x).all() and sol.max_rel_residual > 1e-8
    chol = cholesky_solve(k, b, 0.0)
    assert chol.status in ("breakdown", "converged")
    if chol.status == "converged":  # Cholesky squeaked through rounding: it must then say how bad the residual is
        assert chol.max_rel_residual > 1e-8


def test_max_iterations_status_and_message(rng):
    k = spd_matrix(200, cond=1e6)
    sol = cg(DenseOperator(k, psd=True), rng.standard_normal((200, 2)), options=CGOptions(tol=1e-12, max_iter=5))
    assert sol.status == "max_iterations" and sol.iterations == 5
    assert "max_iter" in sol.message and "--" not in sol.message and sol.max_rel_residual > 1e-12


def test_true_residual_is_reported_not_the_recurrence(rng):
    k = spd_matrix(100, cond=1e5)
    b = rng.standard_normal((100, 3))
    sol = cg(DenseOperator(k, psd=True), b, options=CGOptions(tol=1e-9, true_residual_every=7, max_iter=3000))
    true = np.linalg.norm(b - k @ sol.x, axis=0) / np.linalg.norm(b, axis=0)
    np.testing.assert_allclose(sol.rel_residual, true, rtol=1e-2)
    assert sol.converged and true.max() <= 1e-9


def test_checkpoint_resume_equals_uninterrupted(tmp_path, rng):
    k = rbf(200, 2.0, dim=3)
    b = rng.standard_normal((200, 3))
    kop = DenseOperator(k, psd=True)
    op = kop.shift(1e-3)
    spec = PreconditionerSpec.parse("nystrom:20", landmarks="rpcholesky", seed=3)
    opts = dict(tol=1e-10, max_iter=400, true_residual_every=6)
    full = cg(op, b, build_preconditioner(spec, kop, 1e-3), CGOptions(**opts))
    assert full.converged and full.iterations > 12
    ckpt = str(tmp_path / "state.npz")

    class Killed(Exception):
        pass

    def kill_at_11(info):
        if info["iteration"] == 11:
            raise Killed

    with pytest.raises(Killed):
        cg(op, b, build_preconditioner(spec, kop, 1e-3), CGOptions(**opts, checkpoint_path=ckpt, checkpoint_every=4),
           callback=kill_at_11)
    resumed = cg(op, b, build_preconditioner(spec, kop, 1e-3), CGOptions(**opts, checkpoint_path=ckpt, checkpoint_every=4),
                 resume_from=ckpt)
    assert resumed.iterations == full.iterations and resumed.status == "converged"
    np.testing.assert_allclose(resumed.x, full.x, rtol=1e-12, atol=0)
    assert resumed.history == pytest.approx(full.history, rel=1e-9)
    with pytest.raises(InputError, match="another problem"):
        cg(op, b + 1, options=CGOptions(**opts), resume_from=ckpt)


def test_preconditioners_reduce_iterations_on_ill_conditioned_kernel(rng):
    n = 400
    k = rbf(n, 1.5, seed=1, dim=2)  # fast spectral decay: cond(K + reg I) ~ 2e6
    reg = 1e-4 * np.trace(k) / n
    op = DenseOperator(k, psd=True)
    b = np.eye(4)[rng.integers(0, 4, n)] - 0.25
    opts = CGOptions(tol=1e-6, max_iter=3000)
    iters = {}
    for text, landmarks in [("none", "uniform"), ("jacobi", "uniform"), ("nystrom:60", "uniform"),
                            ("nystrom:60", "rpcholesky")]:
        spec = PreconditionerSpec.parse(text, landmarks=landmarks)
        sol = cg(op.shift(reg), b, build_preconditioner(spec, op, reg), opts)
        assert sol.converged, (text, landmarks, sol.message)
        iters[(text, landmarks)] = sol.iterations
    assert iters[("nystrom:60", "rpcholesky")] * 10 < iters[("none", "uniform")]
    assert iters[("nystrom:60", "uniform")] * 5 < iters[("none", "uniform")]
    assert iters[("nystrom:60", "rpcholesky")] <= iters[("nystrom:60", "uniform")]
    assert iters[("jacobi", "uniform")] <= iters[("none", "uniform")] * 1.1  # constant diagonal: no worse


def test_jacobi_helps_badly_scaled_system(rng):
    k = spd_matrix(150, cond=10)
    s = np.logspace(0, 3, 150)
    k = s[:, None] * k * s[None, :]
    b = rng.standard_normal((150, 2))
    op = DenseOperator(k, psd=True)
    plain = cg(op, b, options=CGOptions(tol=1e-8, max_iter=5000))
    jac = cg(op, b, build_preconditioner(PreconditionerSpec.parse("jacobi"), op, 0.0), CGOptions(tol=1e-8, max_iter=5000))
    assert jac.converged and jac.iterations * 3 < plain.iterations


def test_rpcholesky_approximates_better_than_uniform():
    k = rbf(300, 0.5, seed=2)
    op = DenseOperator(k, psd=True)
    err = {}
    for name, fac in [("rpc", rpcholesky(op, 40, seed=0)), ("uniform", nystrom_uniform(op, 40, seed=0))]:
        f = fac.factor
        resid = k - f @ f.T
        assert np.linalg.eigvalsh(resid).min() > -1e-8  # Nyström residual is PSD
        np.testing.assert_allclose(np.diag(resid), fac.residual_diag, atol=1e-8)
        err[name] = np.trace(resid)
    assert err["rpc"] < err["uniform"]


def test_scalar_residual_nystrom_and_bad_specs(rng):
    k = rbf(300, 2.0, seed=3, dim=3)
    reg = 1e-4 * np.trace(k) / 300
    op = DenseOperator(k, psd=True)
    b = rng.standard_normal((300, 2))
    pre = build_preconditioner(PreconditionerSpec.parse("nystrom:60", residual="scalar"), op, reg)
    sol = cg(op.shift(reg), b, pre, CGOptions(tol=1e-8, max_iter=1000))
    plain = cg(op.shift(reg), b, options=CGOptions(tol=1e-8, max_iter=5000))
    assert sol.converged and sol.iterations * 5 < plain.iterations
    for bad in ["nystrom:0", "nystrom:x", "jacobi:3", "ilu"]:
        with pytest.raises(InputError):
            PreconditionerSpec.parse(bad)
    assert PreconditionerSpec.parse("nystrom").rank == 0  # automatic rank (preconditioners.auto_rank)
    with pytest.raises(InputError):
        CGOptions(tol=0).validate()


def test_driver_loop_equals_init_step_finish_and_step_leaves_its_input(rng):
    k = rbf(120, 2.0, seed=4)
    b = rng.standard_normal((120, 3))
    op = DenseOperator(k, psd=True).shift(1e-2)
    pre = build_preconditioner(PreconditionerSpec.parse("nystrom:15"), DenseOperator(k, psd=True), 1e-2)
    opts = CGOptions(tol=1e-9, max_iter=200, true_residual_every=5)
    st = cg_init(op, b, pre)
    while not cg_done(st, opts):
        before = (st.x.copy(), st.p.copy(), st.col.copy(), st.iteration, list(st.history))
        nxt = cg_step(op, b, pre, st, opts)
        np.testing.assert_array_equal(st.x, before[0])  # the step returned a new state
        np.testing.assert_array_equal(st.p, before[1])
        np.testing.assert_array_equal(st.col, before[2])
        assert (st.iteration, st.history) == (before[3], before[4]) and nxt.iteration == st.iteration + 1
        st = nxt
    st = cg_finish(op, b, st, opts)
    sol = cg(op, b, pre, opts)
    np.testing.assert_array_equal(st.x, sol.x)  # bitwise: the driver is exactly this loop
    assert st.history == sol.history and sol.converged and sol.fix == ""


def test_not_converged_fix_names_python_parameters(rng):
    k = spd_matrix(100, cond=1e6)
    sol = cg(DenseOperator(k, psd=True), rng.standard_normal((100, 2)), options=CGOptions(tol=1e-12, max_iter=3))
    assert sol.status == "max_iterations" and "--" not in sol.fix
    assert "max_iter" in sol.fix and "checkpoint_path/resume_from" in sol.fix and "reg" in sol.fix
    assert sol.in_words(API_NAMES) == sol.message  # the message is in Python names
    cli = sol.in_words(SOLVE_FLAG_NAMES)  # what `kernelscale solve` prints
    assert "reached --max-iter 3 " in cli and "--checkpoint/--resume" in cli and "--precond nystrom:1000" in cli
    api = sol.message
    assert "--" not in api and "reached max_iter 3 " in api and api.endswith(sol.fix)


def test_cholesky_failure_names_python_parameters_and_renders_in_the_solve_commands_flags():
    k = -np.eye(4)  # negative definite: the factorisation fails
    sol = cholesky_solve(k, np.ones(4), reg=0.0)
    assert sol.status == "breakdown" and "--" not in sol.message and "Use a larger reg" in sol.message
    assert sol.in_words(SOLVE_FLAG_NAMES).endswith(
        "Use a larger --reg, or check the Gram store with `kernelscale verify`.")  # what `kernelscale solve` prints
    singular = np.ones((4, 4))  # rank 1: factored with reg 1e-30 only through rounding, or refused
    sol = cholesky_solve(singular, np.arange(4.0), reg=1e-30)
    assert sol.status == "breakdown" and "--" not in sol.message
    assert "--reg" in sol.in_words(SOLVE_FLAG_NAMES)
