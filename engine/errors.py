"""Typed errors raised by mmfuse. Each message names the file, key, line, field, flag or shape at fault.

Every error mmfuse raises on bad input, a bad checkpoint or a failed write is an `MMFuseError`;
the `mmfuse` command prints it as one line and exits non-zero."""


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


class DeviceError(MMFuseError, ValueError):
    """A requested device does not exist in this torch build or on this machine."""


class ExtensionError(MMFuseError, ImportError):
    """A compiled extension (the n-gram C++ code) is not built in this installation."""


class SamplingParamsError(MMFuseError, ValueError):
    """A sampling parameter is out of range or of the wrong type."""


class PromptError(MMFuseError, ValueError):
    """A prompt or input text is empty, not encodable text (a lone surrogate), or holds token ids
    outside the vocabulary."""


class ImageError(MMFuseError, ValueError):
    """An input image cannot be read, has an unsupported layout, or exceeds the pixel budget."""


class NumericalError(MMFuseError, ValueError):
    """A model produced NaN or infinite values (broken weights or a degenerate config): its output
    would be meaningless, so generation stops instead of emitting garbage tokens."""


class NGramError(MMFuseError, ValueError):
    """An n-gram corpus, ARPA or binary model file, build option or query is malformed."""


class ResourceError(MMFuseError, RuntimeError):
    """The machine refused what the work needs (a thread, memory); the message names the option to lower."""


class SettingError(MMFuseError, ValueError):
    """An environment variable (`mmfuse.envs`) or a backend name is outside its allowed values."""


class BackendUnavailableError(MMFuseError, RuntimeError):
    """A requested kernel backend cannot run here (triton not installed, CPU tensors without the
    Triton interpreter)."""


class VocabularyError(PromptError):
    """A text for a world model (mmfuse.world) holds words outside the world's vocabulary."""


class MissingModelError(MMFuseError, FileNotFoundError):
    """A shipped model file is absent from the installation; the message names it and the command
    that regenerates it."""
