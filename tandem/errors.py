"""User-facing errors: each names the file/field and what was expected versus found."""


class TandemError(Exception):
    """Base class for errors that should reach the user as a clear one-line message."""


class ModelLoadError(TandemError):
    """A model file or directory cannot be used (missing, corrupt, unsupported architecture)."""


class ConfigError(TandemError):
    """A configuration field has the wrong type or value."""


class RequestError(TandemError):
    """A generation request is invalid (prompt too long, bad sampling parameter, ...)."""
