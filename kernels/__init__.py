"""mmfuse.kernels: attention and loss kernels (Triton on CUDA) with their PyTorch references."""
from .attention import attention, attention_reference, get_backend, set_backend
from .contrastive import clip_loss, clip_loss_reference, gather_features, siglip_loss, siglip_loss_reference

__all__ = ["attention", "attention_reference", "get_backend", "set_backend",
           "clip_loss", "clip_loss_reference", "gather_features", "siglip_loss", "siglip_loss_reference"]
