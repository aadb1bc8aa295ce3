"""mmfuse: a lean, native-accelerated engine for multimodal language models."""
__version__ = "0.1.0"
