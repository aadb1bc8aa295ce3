"""mmfuse.kernels: attention and loss kernels (Triton on CUDA) with their PyTorch references."""
from .attention import attention, attention_reference, get_backend, set_backend
from .contrastive import clip_loss, clip_loss_reference, gather_features, siglip_loss, siglip_loss_reference

__all__ = ["attention", "attention_reference", "get_backend", "set_backend",
           "decode_attention", "prefill_attention", "lse_reference",
           "clip_loss", "clip_loss_reference", "gather_features", "siglip_loss", "siglip_loss_reference"]



def __getattr__(name):
    """The Triton kernels load on first use, so importing mmfuse.kernels does not import triton."""
    if name in ("prefill_attention", "lse_reference"):
        from . import flash_prefill
        return getattr(flash_prefill, name)
    if name == "decode_attention":
        from .flash_decode import decode_attention
        return decode_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
