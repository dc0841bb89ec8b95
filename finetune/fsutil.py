"""File-system idioms every part of the studio shares: atomic writes, file hashes, a lock across processes.

A reader (the UI, the job store, another studio process) never sees half a file: everything is written to a hidden
temporary file in the same folder and renamed into place."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

__all__ = ["write_text_atomic", "write_json_atomic", "sha256_file", "file_lock"]


def write_text_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` in one rename. mode: the file is shared by every studio process (mkstemp
    would make it private)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data, indent: int = 1, ensure_ascii: bool = True) -> None:
    """JSON (objects the encoder does not know are written with str()) replaced atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent, default=str, ensure_ascii=ensure_ascii) + "\n")


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """The file's sha256 (hex). With `cache` (a JSON file), the digest is remembered by (path, size, mtime), so a
    large file such as a base model's weights is hashed once."""
    path = Path(path)
    if cache is None:
        return _hash(path)
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        known = json.loads(Path(cache).read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = _hash(path)
        with contextlib.suppress(OSError):
            write_json_atomic(cache, known)
    return known[key]


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive lock across processes and threads (flock on `path`, created if needed); released on exit,
    and by the kernel if the holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
