"""Faults injected into `kernelscale distill` (issue 9): a real SIGKILL mid-run, then --resume, ends bitwise equal to
the uninterrupted run; bad inputs (a tampered dataset, a Gram of another kernel, labels out of range) are
refused before compute. (test_kip.py covers a simulated kill after a checkpoint, a kill inside a checkpoint
write, a non-finite loss, --ipc larger than a class, other preprocessing.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from kernelscale.cli import main
from kernelscale.data import open_dataset
from kernelscale.kip.store import open_distilled
from kernelscale.kernels import parse_arch

from fault_helpers import sigkill, start_cli, wait_for
from krr_helpers import pairwise_gram, write_gram

COMMON = ["--arch", "fc:depth=2", "--ipc", "2", "--target-batch", "40", "--lr", "0.02", "--learn-labels",
          "--checkpoint-every", "5", "--seed", "3", "--steps", "120", "--no-progress"]


def _checkpoint(out: str) -> int:
    try:
        return int(json.loads((Path(out) / "zarr.json").read_text())["attributes"].get("checkpoint") or 0)
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_distill_sigkilled_then_resumed_is_bitwise_uninterrupted(mnist_small, tmp_path, capsys):
    full, part = str(tmp_path / "full.zarr"), str(tmp_path / "part.zarr")
    proc = start_cli("distill", mnist_small["train"], *COMMON, "--out", part, log_path=tmp_path / "killed.log")
    try:
        wait_for(lambda: _checkpoint(part) >= 10 or proc.poll() is not None, 180, "the step-10 checkpoint")
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        sigkill(proc)
    finally:
        sigkill(proc)
    killed_at = _checkpoint(part)
    assert 10 <= killed_at < 120 and open_distilled(part).attrs.get("steps_done", 0) < 120
    assert main(["distill", mnist_small["train"], *COMMON, "--out", full]) == 0
    capsys.readouterr()
    assert main(["distill", mnist_small["train"], *COMMON, "--resume", "--out", part, "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["start_step"] == killed_at
    a, b = open_distilled(full), open_distilled(part)
    xa, ya = a.support()
    xb, yb = b.support()
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert np.array_equal(a.history()["loss"], b.history()["loss"]) and len(b.history()["loss"]) == 120
    print(f"RELIABILITY distill_kill {json.dumps({'checkpoint_at_kill': killed_at, 'steps': 120})}")


def test_distill_refuses_tampered_nan_rows_before_compute(mnist_small, tmp_path, capsys):
    import shutil

    data = str(tmp_path / "train.zarr")
    shutil.copytree(mnist_small["train"], data)
    x = zarr.open_group(data, mode="r+")["x"]
    row = np.asarray(x[42:43])
    row.reshape(-1)[5] = np.nan
    x[42:43] = row
    out = tmp_path / "d.zarr"
    code = main(["distill", data, *COMMON, "--steps", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "NaN" in err and "row 42" in err, err
    assert not out.exists()


def test_distill_refuses_gram_of_another_kernel_and_bad_labels(mnist_small, tmp_path, capsys):
    ds = open_dataset(mnist_small["train"])
    other = str(tmp_path / "w2.zarr")
    spec = parse_arch("fc:depth=2,W_std=2.0").to_json()
    write_gram(other, pairwise_gram("fc:depth=2,W_std=2.0", ds.rows(0, ds.n)), tile=64,
               data_fingerprint=ds.fingerprint, spec=spec)
    out = tmp_path / "d.zarr"
    code = main(["distill", mnist_small["train"], *COMMON, "--init", "gram", "--gram", other, "--out", str(out)])
    assert code == 2 and "another kernel" in capsys.readouterr().err and not out.exists()

    import shutil

    data = str(tmp_path / "train.zarr")
    shutil.copytree(mnist_small["train"], data)
    lab = zarr.open_group(data, mode="r+")["labels"]
    values = np.asarray(lab[...])
    values[3] = 10  # 10 classes: 0..9
    lab[...] = values
    code = main(["distill", data, *COMMON, "--out", str(out)])
    assert code == 2 and "labels out of range" in capsys.readouterr().err and not out.exists()
    assert not os.path.exists(out)
