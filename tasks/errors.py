"""Exceptions for broken contracts and bad user input.

Bad *model output* is data (a null score plus a reason), never an exception.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, before any model loads."""

    one_line = True  # logged without a traceback (tasks/io/redact.py): it is the user's to fix, not a bug


class StorageError(Exception):
    """The output store failed (unreachable endpoint, lost connection) after retries with backoff.
    Printed as one line by the CLI; nothing half-written is ever marked complete."""

    one_line = True


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (its type's name if it has none), cut to
    `limit` characters: how an error is shown in one line of a log, a manifest or a quarantine row."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]
