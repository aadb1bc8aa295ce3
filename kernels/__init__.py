"""mmfuse.kernels: attention and loss kernels (Triton on CUDA) with their PyTorch references.

`attention` is the function (attention_dispatch.py); no module of this package shares its name.
"""
from .attention_dispatch import attention, get_backend, set_backend
from .attention_semantics import attention_reference, lse_reference
from .contrastive import clip_loss, clip_loss_reference, gather_features, siglip_loss, siglip_loss_reference

__all__ = ["attention", "attention_reference", "get_backend", "set_backend",
           "decode_attention", "prefill_attention", "lse_reference",
           "clip_loss", "clip_loss_reference", "gather_features", "siglip_loss", "siglip_loss_reference"]


def __getattr__(name):
    """The Triton kernels load on first use, so importing mmfuse.kernels does not import triton."""
    if name == "prefill_attention":
        from .flash_prefill import prefill_attention
        return prefill_attention
    if name == "decode_attention":
        from .flash_decode import decode_attention
        return decode_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
