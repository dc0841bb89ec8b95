"""Where the studio keeps things. Environment variables win so that tests and users can isolate a studio."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from finetune.errors import StudioError

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
    """STUDIO_MODEL_CACHE, else the user's cache (~/.cache/peft-studio/models): the converted embedded model,
    shared by every studio home of the user (a new STUDIO_HOME does not convert it again)."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peft-studio" / "models"
    p = Path(os.environ.get("STUDIO_MODEL_CACHE") or user_cache).resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def uploads_dir() -> Path:
    """STUDIO_HOME/uploads: files a browser uploaded, copied out of gradio's temporary cache."""
    p = studio_home() / "uploads"
    p.mkdir(parents=True, exist_ok=True)
    return p


def gradio_upload_dir() -> Path:
    """Where gradio stores uploads before an event handler sees them (GRADIO_TEMP_DIR, default <tmp>/gradio)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


# --- the folders a client may name ---------------------------------------------------------------------------------
# A job, an evaluation or a preview asked for by a client of the studio reads only below these roots; the operator
# adds more with `launch.py --allow-path DIR` (STUDIO_ALLOWED_PATHS, separated by os.pathsep).
OUTSIDE_ROOTS = ("{field}: not a path this studio may read. Data and models must be under the studio's uploads, the "
                 "adapter store or a folder the operator allowed (launch.py --allow-path DIR)")


class OutsideRootsError(StudioError):
    """A path outside the allowed roots. The message is the same whether or not the path exists."""


def operator_roots() -> list[Path]:
    raw = os.environ.get("STUDIO_ALLOWED_PATHS", "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def allowed_roots(kind: str = "data") -> list[Path]:
    """data: STUDIO_HOME (the operator's chosen data folder: uploads, the demo datasets, files put there), gradio's
    uploads, the store. model: the model cache and the store.
    Uploads are never a model root: a model folder can carry code, and anyone who can reach the studio can upload."""
    if kind == "model":
        own = [model_cache_dir(), adapters_dir()]
    else:
        own = [studio_home(), gradio_upload_dir(), adapters_dir()]
    return [p.resolve() for p in own] + operator_roots()


def is_allowed(path: str | Path, kind: str = "data") -> bool:
    """True if the path, with every symlink resolved, lies inside one of the allowed roots."""
    try:
        real = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return any(real == root or real.is_relative_to(root) for root in allowed_roots(kind))


def confine(path: str | Path, field: str, kind: str = "data") -> Path:
    """The resolved path if it is inside the allowed roots, else OutsideRootsError (never saying whether it exists)."""
    if not is_allowed(path, kind):
        raise OutsideRootsError(OUTSIDE_ROOTS.format(field=field))
    return Path(path).expanduser().resolve()
