"""The one base of errors that mean bad input, importable from every package.

A :class:`UserError` names what was wrong (a missing or foreign file, a bad flag, config key or value,
unusable data) and how to fix it. The ``alit`` command line catches it in one place
(:func:`slurm.cli.main`), prints ``alit <command>: <message>`` on one line and exits with
:data:`EXIT_USAGE`; a run that started and failed exits with :data:`EXIT_FAILED`.
"""

from __future__ import annotations

EXIT_OK = 0  # the command did what it was asked
EXIT_FAILED = 1  # the run started and failed (diverged, locked, stopped early, a job failed)
EXIT_USAGE = 2  # bad input: usage, config, data, a missing or foreign file; nothing was run


class UserError(Exception):
    """Bad input; the message says what and how to fix it (the command line shows no traceback)."""


class UsageError(UserError, ValueError):
    """A command-line flag or value that does not parse or does not fit (e.g. ``--budgets 7``)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (its lines joined with ``; ``)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__
