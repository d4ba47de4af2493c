"""Exceptions that map to the CLI's exit codes.

Exit codes: 0 success, 2 bad input or usage (:class:`InputError`), 3 did not converge
(:class:`NotConvergedError`), 1 anything else.
"""

from __future__ import annotations


class KernelscaleError(Exception):
    """Base class of kernelscale's own errors."""

    exit_code = 1


class InputError(KernelscaleError, ValueError):
    """Bad input or usage: the message says what is wrong and what to do. Raised before expensive work."""

    exit_code = 2


class StoreError(InputError):
    """A store is missing, corrupt, incomplete or belongs to other data/kernel."""


class NotConvergedError(KernelscaleError):
    """An iterative solve stopped without reaching its tolerance."""

    exit_code = 3
