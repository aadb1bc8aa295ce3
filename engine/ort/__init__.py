"""Torch-free runtime for mmfuse's ONNX exports: imports only numpy, onnxruntime and tokenizers."""
