"""The one user-facing error type. The CLI catches it once: one line on stderr, exit code 2.

Anything else that escapes is a bug and keeps its traceback.
"""


class FactoryError(Exception):
    """A problem with the user's input or environment, explained in one line."""
