"""Errors a user can act on. Commands print their message and exit non-zero, no traceback."""


class FlSimError(Exception):
    """Base class: the message alone must tell the user what to fix."""


class DataError(FlSimError):
    """A data file is missing, malformed, or filtered down to nothing."""


class ConfigError(FlSimError):
    """A configuration value is out of range or inconsistent; the message names the key."""
