"""One exception type for every mistake a user can fix.

The CLI turns a `LayershapError` into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback. Library users catch it like any other exception.
"""


class LayershapError(Exception):
    """A problem with the user's input or environment, with the fix in its message."""
