"""Render the CLI reference (docs/cli.md) from the argument parsers, so the docs cannot drift from the code.

``python -m kernelscale.cli.reference > docs/cli.md`` regenerates it; a test fails when it is stale.
"""

from __future__ import annotations

import argparse
import sys

from kernelscale.cli import HelpFormatter, build_parser

HEADER = """# CLI reference

Generated from the argument parsers by `python -m kernelscale.cli.reference > docs/cli.md`
(`tests/test_cli_reference.py` fails when this file is out of date). Every subcommand also takes
`--json` (one JSON summary object as the last line of stdout), `-v` and `--no-progress`.
Exit codes: 0 success, 2 bad input or usage, 3 did not converge, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM), 1 anything else. An interrupted command says how to continue: rerun it (`gram`, `verify`, `demo`),
or rerun it with `--resume` (`distill`; `solve` with `--checkpoint`).
"""


def render() -> str:
    parser = build_parser()
    parts = [HEADER]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    for name, p in sub.choices.items():
        p.formatter_class = lambda prog: HelpFormatter(prog, width=100)
        text = p.format_help().replace("usage: kernelscale", "kernelscale", 1)
        parts.append(f"## `kernelscale {name}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(render())
