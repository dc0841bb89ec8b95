"""Import an adapter from a zip (an export of this studio or of any peft `save_pretrained` folder).

A zip comes from outside, so it is read defensively: no member may leave the staging folder (zip-slip: `..`,
absolute paths, drive letters, symlink entries), and the sizes are bounded before anything is written (zip bombs:
too many members, too much uncompressed data, or an absurd compression ratio). Only the files an adapter needs are
kept (KEPT); other adapter-like files (tokenizer files, cached evaluations under eval/) are skipped: the studio loads
the tokenizer from the base model and recomputes evaluations itself. studio.json may not turn remote code on, and its
evaluation summary is dropped. Files land in a staging folder inside the store and are published with one rename
that never replaces an adapter of that name, so a failed import leaves nothing behind and of two imports under one
name exactly one wins.
"""
from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from finetune import policy
from finetune.fsutil import write_json_atomic
from finetune.store.adapters import META, AdapterError, WEIGHTS, adapter_path, publish, staging_dir
from finetune.config import check_name
from finetune.limits import MAX_ZIP_MEMBERS as MAX_MEMBERS, MAX_ZIP_RATIO as MAX_RATIO
from finetune.limits import MAX_ZIP_SMALL_FILE_BYTES, MAX_ZIP_TOTAL_BYTES as MAX_TOTAL_BYTES

ALLOWED_SUFFIXES = {".safetensors", ".json", ".md", ".txt", ".jinja", ".model", ".bin"}
KEPT = (WEIGHTS, "adapter_config.json", META, "README.md")  # beside adapter_config.json; everything else is skipped


class ZipImportError(AdapterError):
    """A zip that is not a safe adapter archive; the message names the member and the rule it breaks."""


def _members(z: zipfile.ZipFile, source: str) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    infos = z.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ZipImportError(f"{source}: {len(infos)} members (at most {MAX_MEMBERS}); not an adapter archive")
    total = 0
    out = []
    for info in infos:
        name = info.filename
        path = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
            raise ZipImportError(f"{source}: member {name!r} points outside the archive folder (zip-slip); refused")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ZipImportError(f"{source}: member {name!r} is a symbolic link; refused")
        if info.is_dir():
            continue
        if path.suffix.lower() not in ALLOWED_SUFFIXES:
            raise ZipImportError(f"{source}: member {name!r} is not an adapter file ({', '.join(sorted(ALLOWED_SUFFIXES))})")
        if path.name != WEIGHTS and info.file_size > MAX_ZIP_SMALL_FILE_BYTES:
            raise ZipImportError(f"{source}: member {name!r} is {info.file_size} bytes; files other than the weights "
                                 f"are at most {MAX_ZIP_SMALL_FILE_BYTES} bytes")
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise ZipImportError(f"{source}: more than {MAX_TOTAL_BYTES // 2**30} GiB uncompressed; refused (zip bomb?)")
        if info.file_size > 1024 * 1024 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise ZipImportError(f"{source}: member {name!r} expands {info.file_size // max(info.compress_size, 1)}x; "
                                 "refused (zip bomb)")
        out.append((info, path))
    return out


def _root(paths: list[PurePosixPath], source: str) -> PurePosixPath:
    """The folder inside the zip that holds adapter_config.json (the zip's top level or one folder down)."""
    configs = [p.parent for p in paths if p.name == "adapter_config.json" and len(p.parts) <= 2]
    if len(configs) != 1:
        raise ZipImportError(f"{source}: expected exactly one adapter_config.json at the top or one folder down, "
                             f"found {len(configs)}")
    root = configs[0]
    if not any(p.parent == root and p.name in (WEIGHTS, "adapter_model.bin") for p in paths):
        raise ZipImportError(f"{source}: no {WEIGHTS} beside adapter_config.json")
    return root


def import_zip(zip_path: str | Path, name: str | None = None, overwrite: bool = False) -> str:
    """Unpack a safe adapter zip into the store as `name` (default: the zip's folder or file name); return the name."""
    zip_path = Path(zip_path)
    source = zip_path.name
    try:
        z = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ZipImportError(f"{source}: not a readable zip ({e})") from None
    with z:
        members = _members(z, source)
        root = _root([p for _, p in members], source)
        name = name or (root.name if root.parts else zip_path.stem)
        try:
            check_name(name, "adapter name")
        except ValueError as e:
            raise ZipImportError(str(e)) from None
        if adapter_path(name).exists() and not overwrite:
            raise ZipImportError(f"adapter {name!r} already exists in the store; delete it or choose another name")
        stage = staging_dir(name)
        try:
            for info, path in members:
                if path.parent != root or path.name not in KEPT:
                    continue
                rel = path.relative_to(root)
                dest = (stage / rel.as_posix()).resolve()
                if not dest.is_relative_to(stage.resolve()):
                    raise ZipImportError(f"{source}: member {info.filename!r} escapes the staging folder; refused")
                dest.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with z.open(info) as src, open(dest, "wb") as out:
                    # The header's sizes can lie: count what is really inflated.
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > info.file_size:
                            raise ZipImportError(f"{source}: member {info.filename!r} inflates past its declared size")
                        out.write(chunk)
            _check_metadata(stage, source)
            publish(stage, name, replace=overwrite)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return name


def _json_object(path: Path, source: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise ZipImportError(f"{source}: {path.name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise ZipImportError(f"{source}: {path.name} must be a JSON object")
    return data


def _check_metadata(stage: Path, source: str) -> None:
    """studio.json and adapter_config.json come from outside: they may not turn remote code on, and the studio's own
    evaluation summary is not taken from them (it is recomputed by /evaluate)."""
    _json_object(stage / "adapter_config.json", source)
    meta_path = stage / META
    if not meta_path.is_file():
        return
    meta = _json_object(meta_path, source)
    model = (meta.get("config") or {}).get("model") if isinstance(meta.get("config"), dict) else None
    if isinstance(model, dict) and model.get("trust_remote_code"):
        try:
            policy.check_remote_code(True, f"{META} config.model.trust_remote_code")
        except policy.PolicyError as e:
            raise ZipImportError(f"{source}: {e}") from None
    if "eval" in meta:
        del meta["eval"]
        write_json_atomic(meta_path, meta)
