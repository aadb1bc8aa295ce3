"""Vision-language models: an image tower's features projected into a decoder's embedding space."""
