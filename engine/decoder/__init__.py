"""Transformer decoders (GPT-2, Llama/Mistral/Qwen2 families): config, model, static KV cache, checkpoint loading, the generation engine, speculative decoding and their commands."""
