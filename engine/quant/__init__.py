"""Weight-only quantization: mmfuse's own int8/int4 formats and published GPTQ / AWQ checkpoints."""
from .config import QuantConfig
from .linear import QuantizedEmbedding, QuantizedLinear, quantize_weight
from .quantize_model import quantize_decoder

__all__ = ["QuantConfig", "QuantizedLinear", "QuantizedEmbedding", "quantize_weight", "quantize_decoder"]
