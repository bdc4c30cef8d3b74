"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class HetsimError(Exception):
    """Base class of every error hetsim raises on purpose."""


class SpecError(HetsimError):
    """A config, profile or data path is invalid. The message names the file, the key and what was expected."""


class DataError(HetsimError):
    """A data set is missing or malformed at the configured path."""


class HetsimWarning(UserWarning):
    """Something the user should know about a result that is still produced (the CLI prints it as one
    line, `hetsim: warning: ...`)."""
