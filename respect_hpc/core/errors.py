"""The one base of every expected failure: bad input, a missing prerequisite, a refusal.

A :class:`RespectError`'s message is one line that names the file, row or field and what was expected;
the command line prints it and exits with status 2. Anything else that escapes is a bug and shows its
traceback.
"""


class RespectError(Exception):
    """An expected failure, with a one-line message saying what is wrong and where."""
