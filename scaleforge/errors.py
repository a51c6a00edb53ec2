"""Errors that reach the user as one line: what is wrong and what to change."""


class ScaleforgeError(Exception):
    """Base class: the CLI prints `error: <message>` and exits non-zero."""

    exit_code = 2


class ConfigError(ScaleforgeError):
    """A RunSpec, plan, cluster or law file is invalid."""


class LayoutError(ConfigError):
    """A parallel layout does not fit the model or the world size."""


class DataError(ScaleforgeError):
    """A token store or corpus is missing or corrupt."""


class CheckpointError(ScaleforgeError):
    """A checkpoint is missing, truncated or incompatible."""


class FitError(ScaleforgeError):
    """A scaling-law fit cannot be made from the given points."""
