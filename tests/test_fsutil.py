"""The shared folder swap: a reader sees the old folder or the new one, and a crash between two renames is undone."""
import os

import pytest

from finetune import fsutil
from finetune.export import store as export_store


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "f.txt").write_text(text)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_swap_into_place_replaces_and_hands_back_the_old(tmp_path, monkeypatch, exchange):
    if not exchange:  # the path taken on systems without renameat2
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "x", "old")
    old = fsutil.swap_into_place(_folder(tmp_path / ".tmp-new", "new"), target)
    assert (target / "f.txt").read_text() == "new"
    assert old is not None and old.name.startswith(".old-x-") and (old / "f.txt").read_text() == "old"
    assert fsutil.swap_into_place(_folder(tmp_path / ".tmp-y", "y"), tmp_path / "y") is None


def test_restore_orphans_puts_back_only_what_is_missing(tmp_path):
    _folder(tmp_path / ".old-gone-0badc0de", "kept")
    _folder(tmp_path / "here", "current")
    _folder(tmp_path / ".old-here-12345678", "stale")
    assert fsutil.restore_orphans(tmp_path) == ["gone"]
    assert (tmp_path / "gone" / "f.txt").read_text() == "kept"
    assert (tmp_path / "here" / "f.txt").read_text() == "current"


def test_an_export_whose_replacement_was_killed_is_listed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_EXPORTS_DIR", str(tmp_path / "exports"))
    target = export_store.export_path("demo", "gguf", "q8_0")
    staged = export_store.staging_dir()
    (staged / "model.gguf").write_bytes(b"GGUF")
    export_store.write_manifest(staged, {"adapter": "demo", "format": "gguf", "quant": "q8_0"})
    export_store.publish(staged, target)
    # What a kill between "old out of the way" and "new into place" leaves behind:
    os.replace(target, target.with_name(".old-gguf-q8_0-0badc0de"))
    rows = export_store.list_exports("demo")
    assert [(r["format"], r["quant"]) for r in rows] == [("gguf", "q8_0")]
    assert (target / "model.gguf").read_bytes() == b"GGUF"
