"""The GPU fast path (owned by the speed work, issue 7). train.py calls this after LoRA is applied.

On CPU or without optional kernels it changes nothing and says so, so the same recipe runs everywhere.
"""
from __future__ import annotations


def patch_model_for_speed(model, training_cfg) -> list[str]:
    """Apply whatever speed-ups this device supports; return the names of those applied (for the log and studio.json)."""
    return []
