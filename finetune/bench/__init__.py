"""The training speed and memory benchmark: the harness, its arms and its model shapes (outside the runtime path)."""
