"""STUDIO_SPEED, the developer switch of the GPU fast path (finetune/recipe/speed.py): a comma separated list of
"-piece" (off), "+piece" (on) or "none" (nothing at all)."""
from __future__ import annotations

import os


def switches() -> set[str]:
    return {s.strip() for s in os.environ.get("STUDIO_SPEED", "").split(",") if s.strip()}


def wanted(piece: str, default: bool = True) -> bool:
    sw = switches()
    if "none" in sw:
        return False
    if f"-{piece}" in sw:
        return False
    if f"+{piece}" in sw:
        return True
    return default
