"""The one exception type a user should ever see.

A `GalateaError` carries a single line that names the problem and the fix; the CLI prints it
as `error: ...` and exits with status 2, never with a traceback.
"""


class GalateaError(Exception):
    """A user-facing error: one line, saying what is wrong and what to do about it."""


class StoreUnavailable(GalateaError):
    """The chat store cannot be reached (a database outage): the server answers 503 with this
    line, and what was being saved is retried rather than lost."""
