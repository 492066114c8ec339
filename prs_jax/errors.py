"""Exceptions raised for user-facing problems; messages say what, where, and what to do."""


class PrsJaxError(Exception):
    """Base class of all prs_jax user errors."""


class CheckpointError(PrsJaxError):
    """A checkpoint directory, config or weight file is missing, malformed or incompatible."""


class ConfigError(PrsJaxError):
    """A YAML config or command-line override is invalid (unknown key, wrong type)."""


class TokenizerError(PrsJaxError):
    """A tokenizer or chat template is missing or cannot be used as asked."""


class DataError(PrsJaxError):
    """A data file, data set or row is missing, malformed or cannot be tokenised as asked."""


class LockError(PrsJaxError):
    """Another run holds the exclusive lock of an output file or run directory."""


class StampError(DataError):
    """An existing output was written with a config that decides its rows differently; it cannot be resumed."""
