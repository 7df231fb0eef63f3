"""Typed errors. Every error a user can cause is an `EmoEdgeError`: the CLI prints its message on one line
and exits with status 2, no traceback."""


class EmoEdgeError(Exception):
    """A user-facing error. The message names the file, tensor, layer or value at fault."""


class ConfigError(EmoEdgeError):
    """config.json is missing, malformed, or describes something we do not support."""


class CheckpointError(EmoEdgeError):
    """A weight file, shard index or tensor is missing, truncated or has the wrong dtype/shape."""


class PoolError(EmoEdgeError):
    """A pool is unknown, malformed, or does not fit the model."""


class BundleError(EmoEdgeError):
    """An exported bundle is incomplete, corrupted or from another model."""


class BudgetError(EmoEdgeError):
    """A memory budget is unparsable or too small."""
