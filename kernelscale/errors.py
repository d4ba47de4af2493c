"""Exceptions that map to the CLI's exit codes.

Exit codes: 0 success, 2 bad input or usage (:class:`InputError`), 3 did not converge
(:class:`NotConvergedError`), 1 anything else (the CLI adds 130 for Ctrl-C and 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Any, Iterator

#: The yes/no flags messages name, and the keyword argument a Python caller passes instead.
API_WORDS = {"--overwrite": "overwrite=True", "--resume": "resume=True", "--allow-code": "allow_code=True",
             "--repair": "repair=True"}
_FLAG = re.compile("|".join(re.escape(flag) for flag in API_WORDS) + r"(?![\w-])")
_IN_CLI = contextvars.ContextVar("kernelscale_in_cli", default=False)


@contextlib.contextmanager
def cli_words() -> Iterator[None]:
    """Inside this block (the ``kernelscale`` command), error messages name command-line flags."""
    token = _IN_CLI.set(True)
    try:
        yield
    finally:
        _IN_CLI.reset(token)


def in_cli() -> bool:
    """True inside :func:`cli_words` (messages name command-line flags), False for a Python caller."""
    return _IN_CLI.get()


def api_words(message: str) -> str:
    """``message`` for a Python caller: ``pass --overwrite`` becomes ``pass overwrite=True`` (text quoted in
    backticks, such as a command to run, is left as it is)."""
    parts = message.split("`")
    return "`".join(_FLAG.sub(lambda m: API_WORDS[m.group(0)], p) if i % 2 == 0 else p for i, p in enumerate(parts))


class KernelscaleError(Exception):
    """Base class of kernelscale's own errors. Outside the command line, yes/no flags in the message are named
    by their keyword arguments (:func:`api_words`)."""

    exit_code = 1

    def __init__(self, *args: Any) -> None:
        if args and isinstance(args[0], str) and not _IN_CLI.get():
            args = (api_words(args[0]), *args[1:])
        super().__init__(*args)


class InputError(KernelscaleError, ValueError):
    """Bad input or usage: the message says what is wrong and what to do. Raised before expensive work."""

    exit_code = 2


class StoreError(InputError):
    """A store is missing, corrupt, incomplete or belongs to other data/kernel."""


class NotConvergedError(KernelscaleError):
    """An iterative solve or optimisation stopped without reaching its goal (tolerance, finite loss).

    ``summary`` is what the run had done when it stopped (the JSON keys the CLI adds to its error summary).
    """

    exit_code = 3

    def __init__(self, message: str, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.summary: dict[str, Any] = dict(summary or {})
