"""Zip import of adapters: a round trip of a real export works; zip-slip, symlinks, bombs and junk are refused
and leave nothing in the store."""
from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pytest

from finetune.store import adapters
from finetune.store.zip_import import ZipImportError, import_zip


def _fake_adapter_zip(path: Path, extra: dict[str, bytes] | None = None, folder: str = "imp") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{folder}/adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4}))
        z.writestr(f"{folder}/adapter_model.safetensors", b"\0" * 64)
        for k, v in (extra or {}).items():
            z.writestr(k, v)
    return path


def _store_names() -> set[str]:
    return {p.name for p in adapters.adapters_dir().iterdir()} - {".lock"}


def test_import_then_export_round_trip(tmp_path):
    name = import_zip(_fake_adapter_zip(tmp_path / "a.zip", folder="imported-one"))
    assert name == "imported-one"
    assert (adapters.adapter_path(name) / "adapter_model.safetensors").stat().st_size == 64
    again = zipfile.ZipFile(adapters.export_zip(name)).namelist()
    assert "imported-one/adapter_model.safetensors" in again
    with pytest.raises(ZipImportError, match="already exists"):
        import_zip(_fake_adapter_zip(tmp_path / "b.zip", folder="imported-one"))
    adapters.delete_adapter(name)


@pytest.mark.parametrize("evil", ["../../evil.json", "/etc/evil.json", "imp/../../evil.json", "C:/evil.json",
                                  "..\\..\\evil.json"])
def test_zip_slip_refused(tmp_path, evil):
    before = _store_names()
    z = _fake_adapter_zip(tmp_path / "slip.zip", {evil: b"{}"})
    with pytest.raises(ZipImportError, match="zip-slip|outside"):
        import_zip(z)
    assert _store_names() == before
    assert not (tmp_path.parent / "evil.json").exists()


def test_symlink_member_refused(tmp_path):
    p = _fake_adapter_zip(tmp_path / "link.zip")
    with zipfile.ZipFile(p, "a") as z:
        info = zipfile.ZipInfo("imp/README.md")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(ZipImportError, match="symbolic link"):
        import_zip(p)


def test_zip_bomb_refused(tmp_path):
    before = _store_names()
    bomb = _fake_adapter_zip(tmp_path / "bomb.zip", {"imp/tokenizer.json": b"\0" * (64 * 2**20)})
    assert bomb.stat().st_size < 2**20  # 64 MiB of zeros squeezed below 1 MiB
    with pytest.raises(ZipImportError, match="zip bomb"):
        import_zip(bomb)
    assert _store_names() == before


def test_too_many_members_and_junk_refused(tmp_path):
    many = _fake_adapter_zip(tmp_path / "many.zip", {f"imp/{i}.json": b"{}" for i in range(100)})
    with pytest.raises(ZipImportError, match="members"):
        import_zip(many)
    exe = _fake_adapter_zip(tmp_path / "exe.zip", {"imp/run.py": b"import os"})
    with pytest.raises(ZipImportError, match="not an adapter file"):
        import_zip(exe)
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ZipImportError, match="not a readable zip"):
        import_zip(junk)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("imp/adapter_config.json", "{}")
    (tmp_path / "noweights.zip").write_bytes(buf.getvalue())
    with pytest.raises(ZipImportError, match="no adapter_model.safetensors"):
        import_zip(tmp_path / "noweights.zip")


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "..", "x" * 80])
def test_bad_names_refused(tmp_path, bad):
    with pytest.raises(ZipImportError):
        import_zip(_fake_adapter_zip(tmp_path / "n.zip"), name=bad)


def test_cli_import(tmp_path, capsys):
    from finetune.store.adapters import cli

    assert cli(["import", str(_fake_adapter_zip(tmp_path / "c.zip", folder="from-cli"))]) == 0
    assert "imported from-cli" in capsys.readouterr().out
    assert cli(["import", str(_fake_adapter_zip(tmp_path / "d.zip", {"../x.json": b"{}"}))]) == 1
    assert "zip-slip" in capsys.readouterr().err
    adapters.delete_adapter("from-cli")
