"""Errors a user can act on. The CLI prints their message without a traceback."""


class AvsslError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class ConfigError(AvsslError):
    """A config file or override names an unknown field or an invalid value."""


class DataError(AvsslError):
    """A corpus, manifest, shard or media file cannot be used."""


class BadClipError(DataError):
    """One clip cannot be used; `reason` is a short key used to count skips."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable across the decoding worker processes
        return (type(self), (self.reason, str(self)))


class TrackingError(AvsslError):
    """The MLflow tracking server cannot be reached or refuses a request."""


class ResourceError(AvsslError):
    """The requested resources cannot be satisfied by the Ray cluster."""
