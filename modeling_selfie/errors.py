"""The error every command line of the package reports the same way: one `error:` line on stderr, exit code 2.

A light module (no torch), so that the argument parsers and the work modules share the one class."""


class UsageError(Exception):
    """Bad input from the user (an argument, a path, a model folder, a device): one `error:` line, exit code 2."""
