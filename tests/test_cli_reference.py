"""docs/cli.md is generated from the parsers; it must match the code."""

from pathlib import Path

from kernelscale.cli.reference import render


def test_cli_reference_is_up_to_date():
    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    assert doc.read_text() == render(), "docs/cli.md is stale: run `python -m kernelscale.cli.reference > docs/cli.md`"


def test_every_subcommand_is_documented_with_help():
    text = render()
    for name in ("ingest", "gram", "status", "verify", "solve", "eval", "curve", "distill", "evaluate", "demo",
                 "validate-width"):
        assert f"## `kernelscale {name}`" in text
