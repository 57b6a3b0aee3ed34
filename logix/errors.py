"""Typed exceptions. Every message names the bad value, what is allowed, and the fix."""


class LogIXError(Exception):
    """Base class of every error LogIX raises on purpose."""


class ConfigError(LogIXError, ValueError):
    """A configuration key, type or value is not accepted."""


class UsageError(LogIXError, RuntimeError):
    """The API was called in an order or with arguments it cannot serve."""


class LogFormatError(LogIXError, ValueError):
    """A folder is not a readable LogIX log, or does not match the current run."""


class WriterError(LogIXError, RuntimeError):
    """The background writer failed; the rows it could not write are named in the message."""
