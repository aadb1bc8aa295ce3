"""mmfuse.export: ONNX export of the checkpoints mmfuse loads (decoders and encoders)."""
