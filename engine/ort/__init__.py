"""mmfuse.ort: a torch-free runtime for mmfuse ONNX exports (numpy, onnxruntime, tokenizers, pillow only)."""
