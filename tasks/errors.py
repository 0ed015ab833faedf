"""Exceptions for broken contracts and bad user input.

Bad *model output* is data (a null score plus a reason), never an exception.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, before any model loads."""


class StorageError(Exception):
    """The output store failed (unreachable endpoint, lost connection) after retries with backoff.
    Printed as one line by the CLI; nothing half-written is ever marked complete."""
