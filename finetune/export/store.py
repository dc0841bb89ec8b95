"""The exports store: exports_dir()/<adapter>/<format>-<quant>/ holds one finished export and its manifest.json
(size and sha256 of every file). An export is written into a hidden staging folder beside it and renamed into
place, so a reader (or a download link) sees a whole export or none; a killed exporter leaves only a hidden
staging folder, which the next export or listing removes once its process is gone.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from finetune.config import check_name
from finetune.errors import StudioError
from finetune.fsutil import file_lock, restore_orphans, sha256_file, swap_into_place, write_json_atomic
from finetune.paths import studio_home

MANIFEST = "manifest.json"
FORMATS = {"hf": ("bf16", "f16", "f32"), "gguf": ("f16", "q8_0", "q4_0")}
DEFAULT_QUANT = {"hf": "bf16", "gguf": "q8_0"}


class ExportError(StudioError):
    """A request the exporter refuses, in words that name the field."""


def exports_dir() -> Path:
    """STUDIO_EXPORTS_DIR (default STUDIO_HOME/exports)."""
    p = Path(os.environ.get("STUDIO_EXPORTS_DIR") or studio_home() / "exports").resolve()
    p.mkdir(parents=True, exist_ok=True)
    return p


def check_request(adapter: str, fmt: str, quant: str | None) -> str:
    """Validates the request and returns the quant to use (the format's default when None)."""
    try:
        check_name(adapter, "adapter")
    except ValueError as e:
        raise ExportError(str(e)) from None
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of: {', '.join(FORMATS)}")
    quant = quant or DEFAULT_QUANT[fmt]
    if quant not in FORMATS[fmt]:
        raise ExportError(f"quant {quant!r} is not available for format {fmt}; choose one of: {', '.join(FORMATS[fmt])}")
    return quant


def export_path(adapter: str, fmt: str, quant: str) -> Path:
    """exports_dir()/<adapter>/<fmt>-<quant>, after validating every part; never a path outside the store."""
    quant = check_request(adapter, fmt, quant)
    root = exports_dir()
    p = root / adapter / f"{fmt}-{quant}"
    for part in (p.parent, p):
        if part.is_symlink() or (part.exists() and not part.resolve().is_relative_to(root)):
            raise ExportError(f"{part} is a link out of the exports store {root}; refusing to use it")
    return p


# --- staging and publishing ---------------------------------------------------------------------------------------
def sweep_staging() -> list[str]:
    """Remove staging folders whose exporter process is gone (killed mid-export). Returns what was removed."""
    from finetune.jobs.process import pid_alive  # here: the jobs package registers the export kind from this package

    removed = []
    for p in exports_dir().glob(".tmp-*"):
        try:
            pid = int(p.name.split("-")[1])
        except (IndexError, ValueError):
            pid = 0
        if p.is_dir() and not p.is_symlink() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def staging_dir() -> Path:
    """A fresh hidden folder on the store's filesystem (so that publishing is a rename), named by this pid."""
    sweep_staging()
    p = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=exports_dir()))
    os.chmod(p, 0o755)
    return p


def write_manifest(folder: Path, info: dict) -> dict:
    """manifest.json: `info` plus size and sha256 of every file in the folder (written last)."""
    files = [{"path": f.relative_to(folder).as_posix(), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST]
    manifest = {**info, "files": files, "total_bytes": sum(f["bytes"] for f in files), "created_at": time.time()}
    write_json_atomic(folder / MANIFEST, manifest, indent=2)
    return manifest


def _lock():
    return file_lock(exports_dir() / ".lock")


def publish(staged: Path, target: Path) -> Path:
    """Move the finished staging folder to `target`, replacing an older export of the same kind; readers see the
    old export or the new one, never neither (see fsutil.swap_into_place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock():
        old = swap_into_place(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def restore_interrupted() -> None:
    """Put back every export whose replacement was killed between its two renames."""
    with _lock():
        for a in exports_dir().iterdir():
            if a.is_dir() and not a.is_symlink() and not a.name.startswith("."):
                restore_orphans(a, lambda name: name.partition("-")[0] in FORMATS)


# --- reading ------------------------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def list_exports(adapter: str | None = None) -> list[dict]:
    """Published exports (those with a manifest), newest first: adapter, format, quant, path, files, total_bytes."""
    sweep_staging()
    restore_interrupted()
    rows = []
    for a in sorted(exports_dir().iterdir()):
        if a.name.startswith(".") or not a.is_dir() or a.is_symlink() or (adapter and a.name != adapter):
            continue
        for d in sorted(a.iterdir()):
            m = read_manifest(d) if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") else None
            if m:
                rows.append({**m, "path": str(d)})
    rows.sort(key=lambda r: r.get("created_at") or 0, reverse=True)
    return rows


def export_file(adapter: str, fmt: str, quant: str, relpath: str) -> Path:
    """One file of a published export, for downloads: listed in its manifest, inside the store."""
    folder = export_path(adapter, fmt, quant)
    manifest = read_manifest(folder) or {}
    if relpath not in {f["path"] for f in manifest.get("files", [])}:
        raise FileNotFoundError(f"{relpath!r} is not a file of the export {adapter}/{fmt}-{quant}")
    p = (folder / relpath).resolve()
    if not p.is_relative_to(folder.resolve()) or not p.is_file():
        raise FileNotFoundError(f"{relpath!r} is not a file of the export {adapter}/{fmt}-{quant}")
    return p
