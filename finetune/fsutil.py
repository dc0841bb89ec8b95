"""File-system idioms every part of the studio shares: atomic writes, file hashes, a lock across processes.

A reader (the UI, the job store, another studio process) never sees half a file: everything is written to a hidden
temporary file in the same folder and renamed into place."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["write_text_atomic", "write_json_atomic", "sha256_file", "file_lock", "swap_into_place",
           "restore_orphans"]


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(src: Path, target: Path) -> Path | None:
    """Put the folder `src` at `target` (same filesystem). A previous `target` is moved aside to a hidden
    .old-<name>-<hex> beside it and returned, for the caller to remove once its lock is released.

    Readers see the old folder or the new one, never neither: one renameat2 exchange where the system offers it,
    else two renames, whose only possible leftover after a crash is the .old- folder that restore_orphans puts
    back. Call both under the same lock."""
    if not target.exists():
        os.replace(src, target)
        return None
    old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
    if _exchange(src, target):
        os.replace(src, old)  # src now holds the previous version
        return old
    os.replace(target, old)
    try:
        os.replace(src, target)
    except BaseException:
        os.replace(old, target)
        raise
    return old


def restore_orphans(folder: Path, valid_name: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Put back every folder in `folder` that a crash in swap_into_place left only as .old-<name>-<hex> (its
    <name> missing). Returns the names restored. Only under the lock swap_into_place runs under is a .old-
    folder certainly an orphan."""
    restored = []
    for p in folder.glob(".old-*-*"):
        name = p.name[len(".old-"):].rsplit("-", 1)[0]
        target = folder / name
        if valid_name(name) and p.is_dir() and not p.is_symlink() and not target.exists():
            os.replace(p, target)
            restored.append(name)
    return restored
