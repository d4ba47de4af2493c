"""The ``kernelscale`` command line: one module per subcommand, each with ``register`` and ``run``.

Every subcommand has ``--help``, ``--json`` (one JSON summary object as the last line of stdout) and ``-v``.
Exit codes: 0 success, 2 bad input or usage, 3 did not converge, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM), 1 anything else. A ``run`` returns its JSON summary, or a :class:`CommandOutcome` (the summary and
an exit code) when it finished without an error yet must not exit 0 (``verify`` of a bad Gram, a ``solve``
that did not converge).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kernelscale.errors import InputError, KernelscaleError, cli_words
from kernelscale.storage import disk_full_error, is_disk_full

log = logging.getLogger("kernelscale")

#: Subcommand name -> module under kernelscale.cli (each defines register(parser) and run(args), which returns
#: the summary dict or a CommandOutcome).
SUBCOMMANDS: dict[str, str] = {
    "ingest": "ingest",
    "gram": "gram",
    "status": "status",
    "verify": "verify",
    "solve": "solve",
    "eval": "eval",
    "curve": "curve",
    "distill": "distill",
    "evaluate": "evaluate",
    "validate-width": "validate_width",
    "train-finite": "train_finite",
    "demo": "demo",
}


#: What argparse takes for a negative number rather than a flag: also 1e-4-style exponents (``--reg -1e-4``),
#: which argparse before Python 3.13 reads as an unknown flag ("expected one argument").
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


#: How to continue after Ctrl-C / SIGTERM, per subcommand (printed on stderr).
CONTINUE_HINTS: dict[str, str] = {
    "ingest": "rows already written are kept (local OUT): rerun the same command to continue",
    "gram": "tiles already written are kept: rerun the same command to continue",
    "verify": "rerun the same command (with --repair, tiles already recomputed are kept)",
    "solve": "with --checkpoint PATH, rerun the same command with --resume to continue from the last checkpoint",
    "distill": "a checkpoint of the last finished step was written: rerun the same command with --resume",
    "demo": "rerun the same command: finished stages are reused (the Gram resumes, KIP continues)",
}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


@dataclass(frozen=True)
class CommandOutcome:
    """What a subcommand's ``run`` returns to exit with a code other than 0 without an error: the JSON summary
    it prints, and the exit code (e.g. 3 for a solve that did not converge)."""

    summary: dict[str, Any]
    exit_code: int


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that commands save what they can (KIP's checkpoint)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # exit 2 with usage, as argparse does, but through our handler
        self.print_usage(sys.stderr)
        raise InputError(f"{self.prog}: {message}")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each flag's default appended unless its help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS)
        if action.option_strings and shown and "default" not in text.lower():
            text += " (default: %(default)s)"
        return text


def common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON summary object as the last line of stdout")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kernelscale", description="NTK/NNGP Gram matrices, kernel regression and KIP at scale.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(f"{__name__}.{module}")
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=mod.__doc__,
                           formatter_class=HelpFormatter)
        mod.register(p)
        common_flags(p)
        p.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("kernelscale")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _print_human(summary: dict[str, Any]) -> None:
    for key, value in summary.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
            if len(value) > 200:
                value = value[:197] + "..."
        print(f"{key}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kernelscale`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "allow_code", False):
        _working_directory_on_path()
    run: Callable[[argparse.Namespace], dict[str, Any] | CommandOutcome] = args._run
    t0 = time.perf_counter()
    ray_was_running = _ray_running()
    code = 0
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
        # Ctrl-C raises KeyboardInterrupt even if a library (an in-process Ray) replaced Python's handler
        previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread (main() called from a thread): leave the signals alone
        previous_sigterm = previous_sigint = None
    try:
        with cli_words():  # error messages name flags (--overwrite), not keyword arguments
            outcome = run(args)
        if isinstance(outcome, CommandOutcome):
            summary, code = dict(outcome.summary), outcome.exit_code
        else:
            summary = outcome
    except (KernelscaleError, OSError) as exc:
        exc = _as_kernelscale_error(exc)  # a full disk met outside a store's own handling: one line too
        message = _plain(str(exc))
        print(f"error: {message}", file=sys.stderr)
        summary = {"status": "error", "error": message, "exit_code": exc.exit_code}
        summary.update(getattr(exc, "summary", {}) or {})
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        hint = CONTINUE_HINTS.get(args.command, "rerun the command")
        print(f"{'terminated' if terminated else 'interrupted'}: {hint}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
    if not ray_was_running:  # Ray forwards worker log lines to stdout until it stops: keep the JSON last
        _stop_ray()
    summary.setdefault("seconds", round(time.perf_counter() - t0, 3))
    if args.json:
        print(json.dumps(_finite(summary), default=jsonable, sort_keys=False, allow_nan=False))
    else:
        _print_human(summary)
    return code


def _working_directory_on_path() -> None:
    """Make ``--arch module:function --allow-code`` find modules in the working directory, as ``python`` does.

    The ``kernelscale`` console script puts its own bin/ directory first on ``sys.path``, not the working
    directory; this adds the working directory (only for commands given --allow-code).
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _plain(text: str) -> str:
    """An error message without ANSI colour codes (Ray colours its workers' messages)."""
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _as_kernelscale_error(exc: BaseException) -> KernelscaleError:
    """``exc`` itself, or for an OSError of a full disk the one-line error naming the path and the free space;
    any other OSError is re-raised (a bug to see with its traceback)."""
    cause = getattr(exc, "cause", None)  # a Ray worker's error arrives wrapped: use the original one
    if isinstance(cause, (KernelscaleError, OSError)):
        exc = cause
    if isinstance(exc, KernelscaleError):
        return exc
    if is_disk_full(exc):
        path = getattr(exc, "filename", None) or "."
        return disk_full_error(str(path), "writing")
    raise exc


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _stop_ray() -> None:
    """Shut down the Ray this command started (a cluster it connected to keeps running)."""
    if _ray_running():
        sys.modules["ray"].shutdown()
    sys.stderr.flush()
    sys.stdout.flush()


def _finite(obj: Any) -> Any:
    """Strict JSON: NaN/Inf (e.g. the residual of a failed factorisation) become null."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    try:
        import numpy as np  # noqa: PLC0415

        if isinstance(obj, np.floating):
            return _finite(float(obj))
        if isinstance(obj, np.ndarray):
            return _finite(obj.tolist())
    except ImportError:  # pragma: no cover
        pass
    return obj


def jsonable(obj: Any) -> Any:
    """What ``json.dumps`` cannot write itself: NumPy scalars and arrays as Python values, anything else as text."""
    try:
        import numpy as np  # noqa: PLC0415

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
