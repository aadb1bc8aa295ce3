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


class ExportFolderError(MMFuseError, ValueError):
    """An ONNX export folder is missing a file, or a file does not match what the export recorded."""


class ProviderError(MMFuseError, ValueError):
    """An onnxruntime execution provider or session option is unknown or unavailable here."""


class ExportCheckError(MMFuseError, RuntimeError):
    """An exported graph fails onnx.checker, or its outputs differ from the PyTorch engine's beyond tolerance."""
