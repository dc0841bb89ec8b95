"""Evaluation: generation sessions, the metrics registry and adapter-versus-base evaluation."""
