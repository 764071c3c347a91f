"""Errors meant for the user: the CLI prints them without a traceback and exits non-zero."""


class UserError(Exception):
    """Bad input or set-up; the message names the file or setting and the fix."""
