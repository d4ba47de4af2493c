"""A new user's first hour (issue 17): user architectures load as users write them, flags parse, defaults
show, interrupts say how to continue, status shows the live rate, the memory budget per actor."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernelscale.cli import build_parser, main

from fault_helpers import npz_store as _npz_store

ROOT = Path(__file__).resolve().parents[1]
KERNELSCALE = str(Path(sys.executable).parent / "kernelscale")


def _fresh(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a fresh process (nothing imported yet), as a user would from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# -- 1. user architectures -------------------------------------------------------------------------------------


def test_user_module_importing_stax_runs_through_the_console_script(tmp_path, rng):
    """`import neural_tangents.stax as stax` in a module of the working directory, loaded by --arch mod:fn."""
    data = _npz_store(tmp_path, "d", rng.normal(size=(16, 4, 4, 1)))
    (tmp_path / "my_first_net.py").write_text(
        "import neural_tangents.stax as stax\n\n"
        "def net():\n"
        "    return stax.serial(stax.Flatten(), stax.Dense(16), stax.Relu(), stax.Dense(1))\n")
    proc = _fresh([KERNELSCALE, "gram", data, "--arch", "my_first_net:net", "--allow-code", "--out", "g.zarr",
                   "--workers", "1", "--no-progress", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tiles_computed"] == summary["tiles_total"] > 0
    assert "tensorflow" not in proc.stderr


def test_user_guide_python_example_runs_as_written(tmp_path, rng):
    """docs/user-guide.md section 2's Python block, verbatim, in a fresh interpreter."""
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    section = guide.split("## 2. Kernels", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "neural_tangents.stax" in code and "compute_gram" in code
    from kernelscale.data import ingest

    src = tmp_path / "train.npz"
    np.savez(src, images=rng.normal(size=(16, 6, 6, 1)).astype(np.float32), labels=np.arange(16) % 2)
    ingest(str(src), str(tmp_path / "train.zarr"), progress=False)
    proc = _fresh([sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from kernelscale import open_gram

    assert open_gram(str(tmp_path / "gram.zarr")).missing_tiles() == []


def test_user_kernel_without_readout_is_refused_at_trace_time(tmp_path, rng):
    """A convolutional network without Flatten returns (n1, n2, H, W): one clear line, before any compute."""
    from kernelscale import compute_gram
    from kernelscale.errors import InputError
    from kernelscale.kernels import _neural_tangents

    stax = _neural_tangents().stax
    data = _npz_store(tmp_path, "img", rng.normal(size=(16, 4, 4, 1)))
    _, _, fn = stax.serial(stax.Conv(8, (3, 3), padding="SAME"), stax.Relu(), stax.Dense(1))
    with pytest.raises(InputError, match=r"returns shape \(2, 3, 4, 4, 4, 4\).*stax\.Flatten\(\)"):
        compute_gram(data, fn, str(tmp_path / "g.zarr"), kernel_id="no-flatten", progress=False)
    assert not (tmp_path / "g.zarr").exists()


# -- 5. parsing ------------------------------------------------------------------------------------------------


def test_negative_number_reaches_the_validation_message(capsys):
    assert build_parser().parse_args(["solve", "g", "--data", "d", "--reg", "-1e-4", "--out", "m"]).reg == -1e-4
    assert main(["solve", "g.zarr", "--data", "d.zarr", "--reg", "-1e-4", "--out", "m.zarr"]) == 2
    assert "--reg must be a finite number >= 0, got -0.0001" in capsys.readouterr().err


# -- 4. defaults -----------------------------------------------------------------------------------------------


def test_solve_help_shows_the_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = " ".join(sub.choices["solve"].format_help().split())
    assert "--tol T relative residual per class column (default: 1e-06)" in text
    assert "--max-iter K CG iterations at most (default: 1000)" in text
    assert "(default: nystrom)" in text and "--seed S seed of the landmark sampling (default: 0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_nystrom_without_rank_picks_an_automatic_rank():
    from kernelscale.linalg import DenseOperator
    from kernelscale.linalg.preconditioners import PreconditionerSpec, auto_rank, build_preconditioner

    assert [auto_rank(n) for n in (50, 400, 4000, 10_000, 90_000)] == [50, 100, 800, 2000, 3000]
    spec = PreconditionerSpec.parse("nystrom")
    assert spec == PreconditionerSpec.parse("nystrom:auto") and spec.rank == 0
    assert spec.describe(4000).startswith("nystrom:800 (automatic rank")
    x = np.random.default_rng(0).normal(size=(600, 5))
    pre = build_preconditioner(spec, DenseOperator(x @ x.T + np.eye(600), symmetric=True, psd=True), 1e-3)
    assert pre.info["pivots"] == 120


def test_solve_defaults_to_nystrom(tmp_path):
    from krr_helpers import write_gram

    from kernelscale.data import open_dataset
    from kernelscale.krr import solve

    rng = np.random.default_rng(0)
    data = _npz_store(tmp_path, "d", rng.normal(size=(200, 3)), labels=np.arange(200) % 2)
    ds = open_dataset(data)
    x = ds.rows(0, ds.n).reshape(ds.n, -1).astype(np.float64)
    write_gram(str(tmp_path / "g.zarr"), x @ x.T + 1.0, tile=64, data_fingerprint=ds.fingerprint)
    summary = solve(str(tmp_path / "g.zarr"), data, reg=1e-3, out=str(tmp_path / "m.zarr"), progress=False)
    assert summary["status"] == "converged"
    assert summary["precond"].startswith("nystrom:100 (automatic rank")


# -- 3. progress bars -------------------------------------------------------------------------------------------


def test_zca_statistics_and_nystrom_setup_show_progress(tmp_path, rng, capsys):
    from kernelscale.data import ingest
    from kernelscale.linalg import DenseOperator
    from kernelscale.linalg.preconditioners import rpcholesky

    src = tmp_path / "z.npz"
    np.savez(src, images=rng.uniform(size=(64, 4, 4, 1)).astype(np.float32), labels=np.arange(64) % 2)
    ingest(str(src), str(tmp_path / "z.zarr"), preprocess="zca", progress=True)
    x = rng.normal(size=(80, 4))
    rpcholesky(DenseOperator(x @ x.T, symmetric=True, psd=True), 16, progress=True)
    err = capsys.readouterr().err
    assert "zca statistics" in err and "nystrom landmarks" in err


# -- 3. live status ---------------------------------------------------------------------------------------------


def test_status_reports_the_running_drivers_rate_and_eta(tmp_path, rng):
    import time

    from kernelscale import compute_gram, open_gram, parse_arch
    from kernelscale.gram.engine import gram_status
    from kernelscale.gram.store import GramLock
    from kernelscale.gram.progress import ProgressWriter

    data = _npz_store(tmp_path, "d", rng.normal(size=(40, 3)))
    out = str(tmp_path / "g.zarr")
    compute_gram(data, parse_arch("fc"), out, tile=8, max_tiles=0, progress=False)  # store only, no Ray
    idle = gram_status(out)
    assert idle["tiles_per_s"] is None and idle["eta_seconds"] is None and idle["rate_from"] is None
    store = open_gram(out, "r+")
    lock = GramLock(store).acquire()
    try:
        writer = ProgressWriter(store.group, tiles_planned=15)
        writer.record.update(started=time.time() - 10.0, updated=time.time(), tiles_done=5, entries_done=320)
        writer.close()
        live = gram_status(out)
    finally:
        lock.release()
    assert live["rate_from"] == "running driver"
    assert live["tiles_per_s"] == pytest.approx(0.5, rel=0.01)
    assert live["entries_per_s"] == pytest.approx(32.0, rel=0.01)
    assert live["eta_seconds"] == pytest.approx(15 * 64 / 32.0, rel=0.01)  # 15 upper-triangle tiles of 8 x 8
    assert gram_status(out)["rate_from"] is None  # lock released: no driver, no live rate


# -- 8. memory budget -------------------------------------------------------------------------------------------


def test_default_memory_budget_is_shared_by_the_actual_actors(tmp_path, rng, monkeypatch):
    from kernelscale import compute_gram, parse_arch
    from kernelscale.gram import engine

    data = _npz_store(tmp_path, "d", rng.normal(size=(40, 3)))
    monkeypatch.setattr(engine, "available_memory", lambda: 10_000_000_000)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)

    def budget(name: str, **kwargs) -> int:
        summary = compute_gram(data, parse_arch("fc"), str(tmp_path / name), max_tiles=0, progress=False, **kwargs)
        return summary["memory_budget"]

    assert budget("ga.zarr", tile=8) == int(0.4 * 10_000_000_000 / 15)  # 15 tiles, 16 CPUs: 15 actors
    assert budget("gb.zarr", tile=4) == int(0.4 * 10_000_000_000 / 16)  # 55 tiles: one actor per CPU
    assert budget("gc.zarr", tile=4, workers=2) == int(0.4 * 10_000_000_000 / 2)
    assert budget("gd.zarr", tile=40) == int(0.4 * 10_000_000_000 / 1)  # one tile: one actor
    assert budget("ge.zarr", tile=4, memory_budget=12345) == 12345


# -- 6. interrupts ----------------------------------------------------------------------------------------------


class _StopAfter:
    """A stand-in for the KIP progress bar that delivers ``signum`` to this process after ``steps`` updates."""

    def __init__(self, steps: int, signum: int):
        self.steps, self.signum, self.count = steps, signum, 0

    def __call__(self, *args, **kwargs):
        return self

    def update(self, k: int = 1) -> None:
        self.count += k
        if self.count == self.steps:
            os.kill(os.getpid(), self.signum)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_distill_interrupt_saves_the_last_step_and_says_how_to_continue(mnist_small, tmp_path, monkeypatch, capsys,
                                                                        signum, code, word):
    from kernelscale.kip import run as kip_run
    from kernelscale.kip.store import open_distilled

    out = str(tmp_path / "d.zarr")
    monkeypatch.setattr(kip_run, "tqdm", _StopAfter(7, signum))
    args = ["distill", mnist_small["train"], "--ipc", "1", "--steps", "50", "--target-batch", "20", "--out", out]
    assert main(args) == code
    err = capsys.readouterr().err
    assert f"{word}: " in err and "--resume" in err
    assert int(open_distilled(out).attrs["checkpoint"]) == 7  # not 0, the last multiple of --checkpoint-every
    monkeypatch.undo()
    assert main(args + ["--resume", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["start_step"] == 7 and summary["steps_done"] == 50


def test_gram_interrupt_says_rerun(capsys, monkeypatch):
    from kernelscale.cli import gram

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gram, "run", interrupted)
    assert main(["gram", "d.zarr", "--arch", "fc", "--out", "g.zarr"]) == 130
    assert "rerun the same command" in capsys.readouterr().err


# -- 7. hygiene -------------------------------------------------------------------------------------------------


def test_ray_token_notice_is_shown_only_before_the_token_exists(tmp_path, caplog):
    import logging

    from kernelscale.runtime import RAY_TOKEN_LOGGER, quiet_token_notice

    logger = logging.getLogger(RAY_TOKEN_LOGGER)
    saved = list(logger.filters)
    logger.filters[:] = []  # an earlier local Ray start in this process may have installed the filter already
    token = tmp_path / "auth_token"
    try:
        assert not quiet_token_notice(str(token))  # first start: Ray generates the token and says so, once
        token.write_text("x")
        assert quiet_token_notice(str(token)) and quiet_token_notice(str(token))
        assert len(logger.filters) == 1  # installed once, however often it is called
        with caplog.at_level(logging.WARNING, logger=RAY_TOKEN_LOGGER):
            logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
            logger.warning("Token authentication is disabled for this Ray cluster.")
        assert [r.getMessage()[:33] for r in caplog.records] == ["Token authentication is disabled "]
    finally:
        logger.filters[:] = saved


def test_tour_outputs_are_ignored_by_git():
    names = ["distilled_images.png", "distilled_curves.png", "width.png", "train.zarr/zarr.json"]
    proc = subprocess.run(["git", "check-ignore", *names], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.stdout.split() == names


# -- 5. the Python API's words ----------------------------------------------------------------------------------


def test_api_errors_name_keyword_arguments_and_the_cli_names_flags(tmp_path, capsys):
    from kernelscale.data import ingest
    from kernelscale.errors import InputError

    msg = InputError("x.zarr exists; pass --overwrite to replace it (or run `kernelscale gram --overwrite`)")
    assert str(msg) == "x.zarr exists; pass overwrite=True to replace it (or run `kernelscale gram --overwrite`)"
    out = str(tmp_path / "m.zarr")
    ingest("mnist5k", out, limit=20, progress=False)
    with pytest.raises(InputError, match=r"pass overwrite=True") as info:
        ingest("mnist5k", out, limit=20, progress=False)
    assert "--overwrite" not in str(info.value)
    assert main(["ingest", "mnist5k", out, "--limit", "20", "--no-progress"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


# -- 5. one command scores a model or a support set; mix-ups name the fix ---------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Train/test stores (40/20 rows), the train Gram, the cross Gram, the reversed one, a model, a support set."""
    from krr_helpers import pairwise_gram, write_gram

    from kernelscale.data import open_dataset
    from kernelscale.kip.run import distill
    from kernelscale.krr import solve

    root = tmp_path_factory.mktemp("scored")
    rng = np.random.default_rng(3)
    train = _npz_store(root, "train", rng.normal(size=(40, 3, 3, 1)), labels=np.arange(40) % 2)
    test = _npz_store(root, "test", rng.normal(size=(20, 3, 3, 1)), labels=np.arange(20) % 2)
    tr, te = open_dataset(train), open_dataset(test)
    spec = {"arch": "fc", "params": {"depth": 1}, "kernel": "ntk"}
    x, y = tr.rows(0, 40), te.rows(0, 20)
    p = {"train": train, "test": test, "gram": str(root / "gram.zarr"), "cross": str(root / "cross.zarr"),
         "reversed": str(root / "reversed.zarr"), "model": str(root / "model.zarr"), "support": str(root / "s.zarr")}
    write_gram(p["gram"], pairwise_gram("fc:depth=1", x), tile=16, data_fingerprint=tr.fingerprint, spec=spec)
    write_gram(p["cross"], pairwise_gram("fc:depth=1", y, x), tile=16, data_fingerprint=te.fingerprint,
               against_fingerprint=tr.fingerprint, spec=spec)
    write_gram(p["reversed"], pairwise_gram("fc:depth=1", x, y), tile=16, data_fingerprint=tr.fingerprint,
               against_fingerprint=te.fingerprint, spec=spec)
    assert solve(p["gram"], train, reg=1e-3, out=p["model"], progress=False)["status"] == "converged"
    distill(train, out=p["support"], arch="fc:depth=1", ipc=1, steps=2, target_batch=10, progress=False)
    return p


def _cli_json(capsys, *args: str) -> tuple[int, dict]:
    code = main([*args, "--json", "--no-progress"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["evaluate", "eval"])
def test_one_command_scores_a_model_and_a_support_set(scored, capsys, command):
    code, model = _cli_json(capsys, command, scored["model"], "--cross", scored["cross"], "--test", scored["test"])
    assert code == 0 and model["store_kind"] == "model" and 0 <= model["accuracy"] <= 1
    code, support = _cli_json(capsys, command, scored["support"], "--test", scored["test"])
    assert code == 0 and support["store_kind"] == "distilled" and support["n_support"] == 2


@pytest.mark.parametrize("which, cross, match", [
    ("model", "gram", r"is the train Gram K\(train, train\), not a cross Gram.*kernelscale gram .*test\.zarr --against"),
    ("model", "reversed", r"is K\(train, test\), the reverse.*--against swapped"),
    ("model", None, r"is a model: give --cross CROSS\.zarr"),
    ("support", "cross", r"is a distilled support set: .* no --cross"),
    ("gram", "cross", r"is a Gram store; evaluate scores a model"),
])
def test_evaluate_mixups_name_the_fix(scored, capsys, which, cross, match):
    args = ["evaluate", scored[which], "--test", scored["test"]] + (["--cross", scored[cross]] if cross else [])
    code, summary = _cli_json(capsys, *args)
    assert code == 2 and re.search(match, summary["error"]), summary["error"]


def test_model_api_given_a_support_set_says_what_it_is(scored):
    from kernelscale.errors import StoreError
    from kernelscale.krr import evaluate

    with pytest.raises(StoreError, match=r"is a distilled support set, not a model: .*kernelscale evaluate"):
        evaluate(scored["support"], scored["cross"], scored["test"])


# -- 8. declared dependencies -----------------------------------------------------------------------------------


def test_every_third_party_import_of_the_package_is_declared():
    """What kernelscale/ imports (scipy included) is in pyproject.toml (neural-tangents: the Makefile, --no-deps)."""
    import ast
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    declared = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in specs} | {"neural-tangents"}
    dist = {"yaml": "pyyaml", "PIL": "pillow", "neural_tangents": "neural-tangents"}
    imported = set()
    for path in (ROOT / "kernelscale").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"kernelscale"}
    assert "scipy" in third_party
    assert {dist.get(name, name).lower() for name in third_party} - declared == set()


# -- 2. the README tour -----------------------------------------------------------------------------------------


def _documented_commands(path: Path) -> list[list[str]]:
    """Every `kernelscale ...` command in the ```bash blocks of a markdown file, as argv lists."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            for part in line.split(" ; "):
                argv = shlex.split(part, comments=True)
                if argv[:1] == ["kernelscale"]:
                    commands.append(argv[1:])
    return commands


@pytest.mark.parametrize("doc", ["README.md", "docs/user-guide.md"])
def test_documented_commands_parse(doc):
    commands = _documented_commands(ROOT / doc)
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv)  # raises (exit 2) on an unknown flag or a missing argument


def test_readme_tour_uses_the_best_preprocessing_and_is_timed():
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## A three-minute tour", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", tour, re.S).group(1)
    assert "--preprocess standardize" in block and "zca" not in block
    steps = [line for line in block.splitlines() if line.startswith("# ")]
    assert steps and all(re.search(r"~\d+(-\d+)? (s|min)", line) for line in steps)


def test_default_tile_never_exceeds_a_small_matrix(tmp_path, rng):
    from kernelscale import compute_gram, parse_arch
    from kernelscale.gram.engine import default_tile

    assert [default_tile(n, n, True) for n in (1, 5, 12, 13, 40, 10_000)] == [1, 5, 12, 13, 40, 2000]
    data = _npz_store(tmp_path, "d", rng.normal(size=(12, 3)))
    summary = compute_gram(data, parse_arch("fc"), str(tmp_path / "g.zarr"), max_tiles=0, progress=False)
    assert summary["tile"] == 12 and summary["tiles_total"] == 1
