"""Training recipes and the GPU fast path."""
