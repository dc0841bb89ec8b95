"""The adapter store: adapters_dir()/<name>/ holds adapter_model.safetensors, adapter_config.json (peft's own),
studio.json (provenance: base model and its hash, quantization, template, data fingerprint, full config, versions,
metrics, eval summary) and a README.md model card.

Names are one safe path segment (config.check_name) and every path is checked to stay inside the store, so a name
from a form or an API call can never reach another folder. Publishing and deleting are renames, so a reader sees an
adapter whole or not at all.

CLI: python -m finetune adapters list | show NAME | delete NAME | export NAME
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

from finetune.config import check_name
from finetune.errors import StudioError
from finetune.fsutil import file_lock, restore_orphans, swap_into_place, write_json_atomic
from finetune.paths import adapters_dir, studio_home

META = "studio.json"
WEIGHTS = "adapter_model.safetensors"


class AdapterError(StudioError):
    """A bad adapter name or a path that would leave the store."""


# --- paths -------------------------------------------------------------------------------------------------------
def adapter_path(name: str) -> Path:
    """adapters_dir()/<name>, validated: a safe name, and (if it exists) a real folder that resolves inside the store."""
    try:
        check_name(name, "adapter name")
    except ValueError as e:
        raise AdapterError(str(e)) from None
    store = adapters_dir().resolve()
    p = store / name
    if p.is_symlink() or (p.exists() and not p.resolve().is_relative_to(store)):
        raise AdapterError(f"adapter {name!r} is a link out of the store {store}; refusing to use it")
    return p


def _existing(name: str) -> Path:
    p = adapter_path(name)
    if not p.is_dir() or not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {name!r} is not in the store {adapters_dir()}")
    return p


def _store_lock():
    """Serializes writers of the store (publish, delete, metadata updates) across processes."""
    return file_lock(adapters_dir() / ".lock")


def check_writable() -> None:
    """Refuse a job up front when the store could not take its adapter (read-only, or no room for even a small
    file), instead of after training."""
    store = adapters_dir()
    try:
        with tempfile.NamedTemporaryFile(dir=store, prefix=".probe-") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise AdapterError(f"the adapter store {store} cannot take a new adapter ({e.strerror or e}); free space or "
                           "make it writable (STUDIO_ADAPTERS_DIR) before training") from None


def staging_dir(name: str) -> Path:
    """A fresh hidden folder inside the store to write an adapter into before publish() renames it into place
    (same filesystem, so the rename is atomic). Hidden folders are never listed."""
    check_name(name, "adapter name")
    _sweep_leftovers()
    p = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=adapters_dir()))
    os.chmod(p, 0o755)  # mkdtemp makes it private; the published adapter is for every studio process
    return p


def _restore_orphans() -> None:
    """Put back an adapter whose publish was killed between its two renames (only .old-<name>-<hex> is left).
    Under the store lock, which publish holds across both renames, such a folder is always an orphan."""
    with _store_lock():
        restore_orphans(adapters_dir(), _valid_name)


def _valid_name(name: str) -> bool:
    try:
        adapter_path(name)
    except AdapterError:
        return False
    return True


def _sweep_leftovers(max_age_s: float = 3600) -> None:
    """Remove hidden staging/replaced/deleted folders that a killed process left behind (old ones only: a younger
    one may belong to a run that is saving right now), after restoring any adapter that only a .old- folder holds."""
    _restore_orphans()
    now = time.time()
    for p in adapters_dir().glob(".*-*"):
        if p.name.startswith((".tmp-", ".old-", ".deleted-")) and p.is_dir() and not p.is_symlink():
            try:
                if now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


# --- reading -----------------------------------------------------------------------------------------------------
def get_adapter(name: str) -> dict:
    """studio.json of an adapter; for a peft folder copied in from elsewhere, what adapter_config.json tells."""
    p = _existing(name)
    meta_path = p / META
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterError(f"{meta_path}: unreadable ({e})") from None
    else:
        peft_cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
        meta = {"base_model": peft_cfg.get("base_model_name_or_path"), "created_at": (p / "adapter_config.json").stat().st_mtime}
    meta["name"] = name
    return meta


def resolve_base(adapter: str | Path):
    """The ModelConfig of the base an adapter was trained on (a store name, or a peft folder): studio.json's model
    section; for an adapter from elsewhere, its base as peft recorded it, unquantized unless studio.json says so.
    Checked against the studio's policy (remote code, allowed model folders)."""
    from pydantic import ValidationError

    from finetune import policy
    from finetune.config import ModelConfig

    path = Path(adapter)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        meta = json.loads((path / META).read_text(encoding="utf-8")) if (path / META).is_file() else {}
    else:
        path, meta = adapter_path(str(adapter)), get_adapter(str(adapter))
    section = (meta.get("config") or {}).get("model") if isinstance(meta.get("config"), dict) else None
    if not isinstance(section, dict) or not section:
        peft_cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        section = {"name_or_path": meta.get("base_model") or peft_cfg.get("base_model_name_or_path"),
                   "quantization": meta.get("quantization") or "none"}
    try:
        base = ModelConfig.model_validate(section)
    except ValidationError as e:
        raise AdapterError(f"adapter {str(adapter)!r}: studio.json's model section is not valid: "
                           f"{e.errors()[0].get('msg')}") from None
    policy.check_model_config(base, f"adapter {str(adapter)!r}")  # metadata never turns remote code on
    return base


def _summary(name: str, p: Path) -> dict:
    try:
        meta = get_adapter(name)
    except (AdapterError, FileNotFoundError, OSError, json.JSONDecodeError) as e:
        return {"name": name, "error": str(e), "created_at": p.stat().st_mtime, "path": str(p)}
    weights = p / WEIGHTS
    return {
        "name": name,
        "base_model": meta.get("base_model"),
        "quantization": meta.get("quantization"),
        "created_at": meta.get("created_at") or p.stat().st_mtime,
        "metrics": meta.get("metrics") or {},
        "eval": meta.get("eval"),
        "dataset": (meta.get("dataset") or {}).get("path"),
        "size_mb": round(weights.stat().st_size / 2**20, 2) if weights.exists() else None,
        "path": str(p),
    }


def list_adapters() -> list[dict]:
    """Every adapter in the store, newest first."""
    _restore_orphans()
    rows = []
    for p in adapters_dir().iterdir():
        if p.name.startswith(".") or p.is_symlink() or not p.is_dir() or not (p / "adapter_config.json").is_file():
            continue
        try:
            check_name(p.name)
        except ValueError:
            continue
        rows.append(_summary(p.name, p))
    rows.sort(key=lambda r: r.get("created_at") or 0, reverse=True)
    return rows


# --- writing -----------------------------------------------------------------------------------------------------
def publish(src_dir: str | Path, name: str, replace: bool = True) -> Path:
    """Move a finished adapter folder into the store as <name>, replacing an older adapter of that name (or, with
    replace=False, refusing if one exists: checked under the store lock, so of two racing publishes one wins).
    The old version stays in place until the new one is: swapped in one step where the system can, else by two
    renames whose leftover (.old-<name>-*) _restore_orphans puts back if a crash falls between them.
    src_dir should come from staging_dir() (same filesystem) so that the move is a rename."""
    src = Path(src_dir)
    if not (src / "adapter_config.json").is_file():
        raise AdapterError(f"{src} has no adapter_config.json: not an adapter folder")
    target = adapter_path(name)
    holder = None
    if src.parent.resolve() != target.parent.resolve():  # elsewhere: copy it into the store first
        holder = staging_dir(name)
        src = Path(shutil.move(str(src), holder / "adapter"))
    with _store_lock():
        if target.exists() and not replace:
            raise AdapterError(f"adapter {name!r} already exists in the store; delete it or choose another name")
        old = swap_into_place(src, target)
    for leftover in (old, holder):
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
    return target


def update_metadata(name: str, key: str, value) -> dict:
    """Set one top-level key of an adapter's studio.json (e.g. "eval"), replacing the file atomically."""
    p = _existing(name)
    with _store_lock():
        meta_path = p / META
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        meta[key] = value
        write_json_atomic(meta_path, meta, indent=2)
    return meta


def delete_adapter(name: str) -> None:
    p = _existing(name)
    with _store_lock():
        trash = p.with_name(f".deleted-{name}-{uuid.uuid4().hex[:8]}")
        os.replace(p, trash)
    shutil.rmtree(trash, ignore_errors=True)


def export_zip(name: str) -> Path:
    """studio_home()/exports/<name>.zip with the adapter's files under <name>/ (written aside, then renamed)."""
    p = _existing(name)
    out_dir = studio_home() / "exports"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.zip"
    tmp = out_dir / f".{name}.{uuid.uuid4().hex[:8]}.zip"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.is_symlink() and not f.name.startswith("."):
                    z.write(f, f"{name}/{f.relative_to(p).as_posix()}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --- CLI ---------------------------------------------------------------------------------------------------------
def _fmt_time(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune adapters", description=f"the adapter store ({adapters_dir()})")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="adapters, newest first")
    ls.add_argument("--json", action="store_true")
    sub.add_parser("show", help="print an adapter's studio.json").add_argument("name")
    sub.add_parser("delete", help="delete an adapter").add_argument("name")
    sub.add_parser("export", help="write a zip under STUDIO_HOME/exports and print its path").add_argument("name")
    imp = sub.add_parser("import", help="add an adapter from a zip (an export, or a zipped peft folder)")
    imp.add_argument("zip")
    imp.add_argument("--name", help="store it under this name (default: the zip's folder name)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "list":
            rows = list_adapters()
            if a.json:
                print(json.dumps(rows, indent=2, default=str))
            else:
                print(f"{'name':<32} {'base model':<24} {'quant':<5} {'created':<16} final loss")
                for r in rows:
                    loss = (r.get("metrics") or {}).get("final_loss")
                    print(f"{r['name']:<32} {str(r.get('base_model'))[:24]:<24} {str(r.get('quantization') or '-'):<5} "
                          f"{_fmt_time(r.get('created_at')):<16} {'-' if loss is None else f'{loss:.4f}'}")
        elif a.cmd == "show":
            print(json.dumps(get_adapter(a.name), indent=2, default=str))
        elif a.cmd == "delete":
            delete_adapter(a.name)
            print(f"deleted {a.name}")
        elif a.cmd == "export":
            print(export_zip(a.name))
        elif a.cmd == "import":
            from finetune.store.zip_import import import_zip

            print(f"imported {import_zip(a.zip, a.name)}")
    except (AdapterError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
