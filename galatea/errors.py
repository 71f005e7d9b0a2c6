"""The one exception type a user should ever see.

A `GalateaError` carries a single line that names the problem and the fix; the CLI prints it
as `error: ...` and exits with status 2, never with a traceback.
"""


class GalateaError(Exception):
    """A user-facing error: one line, saying what is wrong and what to do about it."""


class StoreUnavailable(GalateaError):
    """The chat store cannot be reached (a database outage): the server answers 503 with this
    line, and what was being saved is retried rather than lost."""


class ModelUnavailable(GalateaError):
    """A model cannot take the request now (it was unloaded while the request waited, or memory
    is held by models that are busy): the server answers 503, and the client may retry."""


class ModelNotFound(GalateaError):
    """A request names a model this server does not offer: 404, naming the ones it does."""
