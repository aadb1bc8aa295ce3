"""Typed errors raised by mmfuse. Each message names the file, key, line or shape at fault."""


class MMFuseError(Exception):
    """Base class of every error mmfuse raises on bad input."""


class CheckpointError(MMFuseError, ValueError):
    """A checkpoint folder is missing a file, holds a bad tensor, or cannot be read."""


class ConfigError(MMFuseError, ValueError):
    """A config.json names an unknown architecture or an unsupported field or value."""


class CapacityError(MMFuseError, ValueError):
    """A request needs more positions than the KV cache or the model's context holds."""


class OutputError(MMFuseError, OSError):
    """An output file or folder cannot be written (unwritable place, full disk); the old file is kept."""


class PromptError(MMFuseError, ValueError):
    """A prompt or conversation does not fit the model: image placeholders vs images, a bad message."""
