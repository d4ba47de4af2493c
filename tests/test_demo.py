"""`make demo`'s pipeline end to end on a small slice of mnist5k, and its resume on rerun."""

import json

from kernelscale.cli import main


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys, ray_local):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--limit", "400", "--kip-steps", "10", "--no-progress", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["krr_accuracy"] > 0.7 and 0 <= first["kip_robust_accuracy"] <= first["kip_accuracy"]
    report = json.loads((out / "report.json").read_text())
    assert report["gram"]["tiles_computed"] == report["gram"]["tiles_total"] > 0
    assert report["solve"]["status"] == "converged"
    for png in report["plots"].values():
        assert (out / png).exists() or __import__("os").path.exists(png)
    assert main(args) == 0  # rerun: resumes, recomputes nothing
    capsys.readouterr()
    again = json.loads((out / "report.json").read_text())
    assert again["gram"]["tiles_computed"] == 0 and again["gram"]["tiles_skipped"] == report["gram"]["tiles_total"]
    assert again["cross_gram"]["tiles_computed"] == 0
    assert again["solve"]["status"] == "reused"
    assert again["summary"]["krr_accuracy"] == first["krr_accuracy"]
