"""The adapter store: publish is a rename, names cannot leave the store, list/show/export/delete work (API and CLI).

These tests use small hand-made adapter folders; the folders a real training run publishes are checked in
test_train.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from finetune.store import adapters
from finetune.paths import adapters_dir, studio_home

ROOT = Path(__file__).resolve().parent.parent


def make_adapter(name: str, created_at: float | None = None, **meta) -> Path:
    src = adapters.staging_dir(name)
    (src / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base", "peft_type": "LORA"}))
    (src / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (src / "studio.json").write_text(json.dumps({"name": name, "created_at": created_at or time.time(),
                                                 "base_model": "SmolLM2-135M-Instruct", "quantization": "4bit",
                                                 "metrics": {"final_loss": 0.5}, **meta}))
    (src / "README.md").write_text(f"# {name}\n")
    return adapters.publish(src, name)


@pytest.fixture(autouse=True)
def clean_store():
    yield
    for p in adapters_dir().iterdir():
        if p.name.startswith("store-"):
            (p.unlink() if p.is_symlink() else __import__("shutil").rmtree(p))


def test_publish_list_get_newest_first():
    make_adapter("store-old", created_at=1000.0)
    make_adapter("store-new", created_at=2000.0)
    names = [a["name"] for a in adapters.list_adapters() if a["name"].startswith("store-")]
    assert names == ["store-new", "store-old"]
    row = next(a for a in adapters.list_adapters() if a["name"] == "store-new")
    assert row["base_model"] == "SmolLM2-135M-Instruct" and row["quantization"] == "4bit"
    assert row["metrics"]["final_loss"] == 0.5
    assert adapters.get_adapter("store-old")["created_at"] == 1000.0
    # Nothing half-published is left behind in the store.
    assert not [p for p in adapters_dir().iterdir() if p.name.startswith(".tmp-store-")]


def test_publish_replaces_same_name_whole():
    make_adapter("store-x", marker="first")
    make_adapter("store-x", marker="second")
    assert adapters.get_adapter("store-x")["marker"] == "second"
    assert not [p for p in adapters_dir().iterdir() if p.name.startswith(".old-store-x")]


def test_update_metadata_keeps_other_keys():
    make_adapter("store-meta")
    adapters.update_metadata("store-meta", "eval", {"rougeL": 0.4})
    meta = adapters.get_adapter("store-meta")
    assert meta["eval"] == {"rougeL": 0.4} and meta["metrics"]["final_loss"] == 0.5


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".", "..", "/etc", "x" * 65, ".hidden", "na me"])
def test_names_cannot_leave_the_store(bad):
    with pytest.raises(adapters.AdapterError):
        adapters.adapter_path(bad)
    with pytest.raises((adapters.AdapterError, FileNotFoundError)):
        adapters.get_adapter(bad)


def test_symlink_out_of_the_store_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    (adapters_dir() / "store-link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(adapters.AdapterError, match="link out of the store"):
        adapters.adapter_path("store-link")
    with pytest.raises(adapters.AdapterError):
        adapters.delete_adapter("store-link")
    assert "store-link" not in [a["name"] for a in adapters.list_adapters()]
    assert (outside / "adapter_config.json").exists()  # never touched


def test_missing_adapter_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="store-nope"):
        adapters.get_adapter("store-nope")


def test_export_zip_and_delete():
    make_adapter("store-zip")
    z = adapters.export_zip("store-zip")
    assert z == studio_home() / "exports" / "store-zip.zip"
    names = zipfile.ZipFile(z).namelist()
    assert "store-zip/adapter_model.safetensors" in names and "store-zip/studio.json" in names
    assert not [p for p in z.parent.iterdir() if p.name.startswith(".")]  # no temporary zip left
    adapters.delete_adapter("store-zip")
    assert not (adapters_dir() / "store-zip").exists()
    assert "store-zip" not in [a["name"] for a in adapters.list_adapters()]


def test_cli_list_show_export_delete():
    make_adapter("store-cli")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "finetune", "adapters", *args], cwd=ROOT, capture_output=True,
                              text=True, env=os.environ)

    out = cli("list")
    assert out.returncode == 0 and "store-cli" in out.stdout
    assert any(r["name"] == "store-cli" for r in json.loads(cli("list", "--json").stdout))
    assert json.loads(cli("show", "store-cli").stdout)["base_model"] == "SmolLM2-135M-Instruct"
    assert Path(cli("export", "store-cli").stdout.strip()).is_file()
    assert cli("delete", "store-cli").returncode == 0
    bad = cli("show", "store-cli")
    assert bad.returncode == 1 and "not in the store" in bad.stderr
    assert cli("show", "../x").returncode == 1


def test_stale_staging_folders_are_swept():
    stale = adapters_dir() / ".tmp-store-stale-abc"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = adapters_dir() / ".tmp-store-fresh-abc"
    fresh.mkdir()
    make_adapter("store-sweep")
    assert not stale.exists() and fresh.exists()  # a fresh one may be a run saving right now
    fresh.rmdir()
