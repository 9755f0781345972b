"""Exceptions shared by the command-line tools."""


class UserError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits 2."""
