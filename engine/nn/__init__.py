"""Layers shared by the decoders, the encoders and the vision-language models: attention blocks, MLPs, norms, RoPE."""
