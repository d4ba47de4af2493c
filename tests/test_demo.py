"""`make demo`'s pipeline end to end on a small slice of mnist5k, and its resume on rerun."""

import json
from pathlib import Path

from kernelscale.cli import main


def _paths(obj):
    """Every string in a report that names a file or store."""
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in _paths(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in _paths(v)]
    return [obj] if isinstance(obj, str) and obj.endswith((".zarr", ".png", ".json")) else []


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys, ray_local, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    args = ["demo", "--out", "demo", "--limit", "400", "--kip-steps", "10", "--no-progress", "--json"]  # relative
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("report.json") == 1  # the report path is printed once (in the summary)
    first = json.loads(stdout.strip().splitlines()[-1])
    assert first["report"] == str(out / "report.json")
    assert first["krr_accuracy"] > 0.7 and 0 <= first["kip_robust_accuracy"] <= first["kip_accuracy"]
    report = json.loads((out / "report.json").read_text())
    assert report["gram"]["tiles_computed"] == report["gram"]["tiles_total"] > 0
    assert report["solve"]["status"] == "converged"
    paths = _paths(report)
    assert len(paths) >= 10 and all(p.startswith(str(tmp_path)) for p in paths), paths  # all absolute
    for png in report["plots"].values():
        assert Path(png).is_file()
    assert main(args) == 0  # rerun: resumes, recomputes nothing
    capsys.readouterr()
    again = json.loads((out / "report.json").read_text())
    assert again["gram"]["tiles_computed"] == 0 and again["gram"]["tiles_skipped"] == report["gram"]["tiles_total"]
    assert again["cross_gram"]["tiles_computed"] == 0
    assert again["solve"]["status"] == "reused"
    assert again["summary"]["krr_accuracy"] == first["krr_accuracy"]
