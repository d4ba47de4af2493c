"""Typed command configs (kernelscale.config) and typed results: one declaration per setting gives the CLI
flags, the Python defaults, the validation wording and the resume keys; results print today's JSON keys."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kernelscale import config
from kernelscale.cli import build_parser
from kernelscale.cli.demo_pipeline import DemoConfig
from kernelscale.cli.evaluate import EvaluateConfig
from kernelscale.errors import InputError, NotConvergedError, cli_words
from kernelscale.kip.run import RESUME_KEYS, DistillResult, KipConfig, check_distill
from kernelscale.krr import SOLVE_FLAG_NAMES, CurveConfig, SolveConfig, curve_solves
from kernelscale.krr.results import CurveResult, SolveResult


@pytest.mark.parametrize("cls, argv", [
    (KipConfig, ["distill", "d.zarr", "--out", "o.zarr"]),
    (SolveConfig, ["solve", "g.zarr", "--data", "d.zarr", "--reg", "0.5", "--out", "o.zarr"]),
    (CurveConfig, ["curve", "g.zarr", "--data", "d.zarr", "--cross", "c.zarr", "--test", "t.zarr", "--sizes", "5"]),
    (EvaluateConfig, ["evaluate", "m.zarr", "--test", "t.zarr"]),
    (EvaluateConfig, ["eval", "m.zarr", "--test", "t.zarr"]),
    (DemoConfig, ["demo"]),
])
def test_cli_defaults_equal_the_python_defaults(cls, argv):
    args = build_parser().parse_args(argv)
    from_cli = config.from_namespace(cls, args)
    given = {f.name: getattr(from_cli, f.name) for f in dataclasses.fields(cls)
             if f.default is dataclasses.MISSING}
    assert from_cli == cls(**given)


def test_kip_defaults_are_the_commands_not_make_kips():
    """distill's documented defaults (--help): labels fixed, cosine schedule."""
    cfg = KipConfig(data="d.zarr", out="o.zarr")
    assert (cfg.learn_labels, cfg.schedule, cfg.lr, cfg.steps, cfg.target_batch) == (False, "cosine", 0.01, 6000, 2000)


def test_validation_names_the_flag_on_the_cli_and_the_keyword_in_python():
    cfg = KipConfig(data="d.zarr", out="o.zarr", ipc=0)
    with pytest.raises(InputError, match=r"^ipc must be >= 1, got 0$"):
        config.validate(cfg)
    with cli_words(), pytest.raises(InputError, match=r"^--ipc must be >= 1, got 0$"):
        config.validate(cfg)
    with pytest.raises(InputError, match=r"^reg_scale must be one of trace, absolute, got 'log'$"):
        config.validate(SolveConfig(gram="g", data="d", reg=1.0, out="o", reg_scale="log"))
    with pytest.raises(InputError, match=r"^reg must be a finite number >= 0, got nan$"):
        config.validate(SolveConfig(gram="g", data="d", reg=float("nan"), out="o"))


def test_solver_options_are_checked_in_the_words_of_the_caller():
    """tol, max_iter and precond: --flags on the command line (as linalg said before), Python names otherwise."""
    for cfg, cli, api in [
        (SolveConfig(gram="g", data="d", reg=1.0, out="o", tol=0.0), "--tol must be in (0, 1) (a relative residual), "
         "got 0.0", "tol must be in (0, 1) (a relative residual), got 0.0"),
        (CurveConfig(gram="g", data="d", cross="c", test="t", sizes="5", max_iter=-1), "--max-iter must be >= 0, "
         "got -1", "max_iter must be >= 0, got -1"),
        (SolveConfig(gram="g", data="d", reg=1.0, out="o", precond="nystrom:0"), "--precond nystrom:RANK needs "
         "RANK >= 1, got 0", "precond nystrom:RANK needs RANK >= 1, got 0"),
    ]:
        with cli_words(), pytest.raises(InputError) as on_cli:
            config.validate(cfg)
        with pytest.raises(InputError) as in_python:
            config.validate(cfg)
        assert (str(on_cli.value), str(in_python.value)) == (cli, api)


def test_solve_flag_names_render_the_message_kernelscale_solve_prints():
    from kernelscale.linalg import CGOptions, DenseOperator, cg

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    sol = cg(DenseOperator(q @ np.diag(np.logspace(0, 6, 60)) @ q.T, psd=True), rng.standard_normal((60, 2)),
             options=CGOptions(tol=1e-12, max_iter=3))
    assert sol.status == "max_iterations" and "--" not in sol.message  # the message is in Python names
    assert sol.in_words(SOLVE_FLAG_NAMES) == (
        f"not converged: 3 iterations reached --max-iter 3 with max relative residual {sol.max_rel_residual:.3g} > "
        "--tol 1e-12. Try a stronger preconditioner (--precond nystrom:1000 or more), more iterations (--max-iter; "
        "add --checkpoint/--resume to continue this run), a larger --reg, or --solver cholesky if N fits in memory.")


def test_unknown_setting_is_a_type_error_like_an_unknown_keyword():
    with pytest.raises(TypeError, match="no parameter bogus"):
        config.build(SolveConfig, None, {"gram": "g", "data": "d", "reg": 1.0, "out": "o", "bogus": 1})


def test_overrides_replace_the_fields_of_a_given_config():
    base = SolveConfig(gram="g", data="d", reg=1.0, out="o")
    assert config.build(SolveConfig, base, {"tol": 1e-3}) == dataclasses.replace(base, tol=1e-3)


def test_resume_keys_are_the_ones_stores_were_written_with():
    old = ("spec", "reg", "lr", "label_lr", "schedule", "learn_labels", "ipc", "target_batch", "seed", "init",
           "dataset_fingerprint", "adversarial", "target_augment", "target_sampling")
    assert sorted(RESUME_KEYS) == sorted(old)


def test_check_distill_refuses_init_gram_without_gram_before_opening_data(tmp_path):
    cfg = KipConfig(data=str(tmp_path / "absent.zarr"), out=str(tmp_path / "o.zarr"), init="gram")
    with pytest.raises(InputError, match="--init gram needs --gram"):
        check_distill(cfg)


def _solve_result(**kw) -> SolveResult:
    base = dict(status="converged", iterations=3, rel_residual=1e-7, seconds=0.5, message="ok", solver="cg", n=10,
                classes=2, reg=1e-3, reg_scale="trace", reg_effective=1e-3, precond="nystrom:2")
    return SolveResult(**(base | kw))


def test_solve_result_json_keys_are_the_cli_summarys():
    chol = _solve_result(solver="cholesky", precond="n/a", out="m.zarr")
    assert list(chol.to_json()) == ["status", "iterations", "rel_residual", "seconds", "message", "solver", "n",
                                    "classes", "reg", "reg_scale", "reg_effective", "precond", "out"]
    cg = _solve_result(operator="zarr", precond_seconds=0.1, products=4, operator_seconds=0.2,
                       seconds_per_iteration=0.05)
    assert list(cg.to_json())[11:] == ["precond", "operator", "precond_seconds", "products", "operator_seconds",
                                       "seconds_per_iteration", "out"]
    assert cg["status"] == "converged" and dict(cg) == cg.to_json() and (cg | {"x": 1})["x"] == 1


def test_a_solve_that_did_not_converge_raises_not_converged_with_its_summary():
    stopped = _solve_result(status="max_iterations", message="stopped")
    with pytest.raises(NotConvergedError, match="stopped") as info:
        stopped.raise_for_status()
    assert info.value.exit_code == 3 and info.value.summary["status"] == "max_iterations"
    assert _solve_result().raise_for_status().converged


def test_curve_loop_raises_not_converged_on_a_failed_solve():
    k = -np.eye(4)  # not positive definite: Cholesky fails
    with pytest.raises(NotConvergedError, match="size 4"):
        list(curve_solves(k, np.ones((4, 2)), [4], reg=0.0, reg_scale="absolute"))


def test_curve_loop_solves_each_size_like_a_direct_solve():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((6, 6))
    k, y = f @ f.T + np.eye(6), rng.standard_normal((6, 2))
    got = {n: (alpha, how) for n, alpha, how in curve_solves(k, y, [3, 6], reg=0.1, reg_scale="absolute")}
    for n in (3, 6):
        np.testing.assert_allclose(got[n][0], np.linalg.solve(k[:n, :n] + 0.1 * np.eye(n), y[:n]), rtol=1e-8)
        assert got[n][1] == "cholesky"


def test_curve_result_leaves_out_seed_and_seconds_for_in_memory_curves():
    assert list(CurveResult(sizes=[1])) == ["sizes", "accuracy", "mse", "solve_seconds", "solver", "reg", "reg_scale"]
    assert list(CurveResult(sizes=[1], seed=0, seconds=1.0))[-2:] == ["seed", "seconds"]


def test_distill_result_json_order_is_the_cli_summarys():
    r = DistillResult(out="o", kernel="k", n_support=2, ipc=1, steps=1, start_step=0, target_batch=4, lr=0.1,
                      label_lr=0.1, schedule="cosine", reg=0.0, kss_tile=None, learn_labels=False, workers=1,
                      init="random", target_augment="none", target_sampling="rows", adversarial="linf:0.1",
                      reference={"label_solve_floor": {}, "full_krr_ceiling": None},
                      plots={"images_png": "a.png", "curves_png": "b.png"})
    keys = list(r.to_json())
    assert keys[16:21] == ["target_sampling", "adversarial", "label_solve_floor", "full_krr_ceiling", "images_png"]
    assert keys[22:] == ["status", "steps_done", "final_loss", "seconds_per_step", "first_step_seconds",
                         "comm_seconds_per_step", "val_accuracy", "val_accuracy_init", "history", "train_seconds"]
    assert "images_png" not in r.settings_json()
