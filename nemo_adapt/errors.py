"""Errors that mean "the input is wrong", raised before expensive work starts.

The CLI prints them as one line (no traceback) and exits with code 2; anything else is a bug.
"""


class NemoAdaptError(Exception):
    """Bad user input: a message that names the file, key or value and what would be valid."""


class ConfigError(NemoAdaptError, ValueError):
    """A recipe, override or argument is invalid."""


class CheckpointError(NemoAdaptError, ValueError):
    """A checkpoint is missing, unreadable or does not match the model."""


class ParallelLayoutError(ConfigError):
    """A tensor/pipeline/data layout does not divide the model or the GPUs."""
