"""The model-independent parts of generation: sampling and incremental detokenisation with stop strings."""
