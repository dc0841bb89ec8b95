"""Where the studio keeps things. Environment variables win so that tests and users can isolate a studio."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def studio_home() -> Path:
    """STUDIO_HOME (default ./studio_data): studio.db, runs/<job_id>/, the model cache, demo data."""
    p = Path(os.environ.get("STUDIO_HOME") or PROJECT_ROOT / "studio_data").resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def adapters_dir() -> Path:
    """STUDIO_ADAPTERS_DIR (default ./adapters): the adapter store."""
    p = Path(os.environ.get("STUDIO_ADAPTERS_DIR") or PROJECT_ROOT / "adapters").resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def runs_dir() -> Path:
    p = studio_home() / "runs"
    p.mkdir(parents=True, exist_ok=True)
    return p


def model_cache_dir() -> Path:
    """STUDIO_MODEL_CACHE (default STUDIO_HOME/models): converted embedded model, so tests can share one."""
    p = Path(os.environ.get("STUDIO_MODEL_CACHE") or studio_home() / "models").resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p
