"""mmfuse.kernels: attention and loss kernels (Triton on CUDA) with their PyTorch references."""
from .attention import attention, attention_reference, get_backend, set_backend

__all__ = ["attention", "attention_reference", "get_backend", "set_backend"]
