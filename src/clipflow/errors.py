"""Errors that a user caused and can fix: the CLI prints them as one line, no traceback."""


class ClipflowError(Exception):
    """Bad input or configuration, reported to the user as one clear line."""
