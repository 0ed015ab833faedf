"""Exceptions for broken contracts and bad user input.

Bad *model output* is data (a null score plus a reason), never an exception.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, before any model loads."""
