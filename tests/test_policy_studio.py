"""What a client of a real running studio (launch.py, no operator flags) can make it do, through gradio_client:
no remote code, no file outside the allowed roots read (nor its existence told), no network attempt for a hub id
taken from an imported file, no imported evaluation served, and every oversized or malformed request refused with a
message naming the field."""
from __future__ import annotations

import json
import socket
import threading
import uuid
from pathlib import Path

import pytest
import yaml

from finetune import limits
from finetune.config import example_config
from finetune.paths import gradio_upload_dir
import conftest
from tests.studio_server import as_json, running_studio

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


class ProxyTrap:
    """A local "proxy" that only counts who connects: the studio's HTTP(S)_PROXY points here, so any attempt to
    reach the network from the studio arrives at this socket instead of leaving the machine."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.requests: list[bytes] = []
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(200))
                except OSError:
                    self.requests.append(b"?")

    def close(self):
        self.closed.set()
        self.sock.close()


@pytest.fixture(scope="module")
def trap():
    t = ProxyTrap()
    yield t
    t.close()


@pytest.fixture(scope="module")
def studio(tmp_path_factory, trap):
    home = tmp_path_factory.mktemp("policy-studio")
    proxy = {k: trap.url for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")}
    env = {**proxy, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "HF_HUB_OFFLINE": None,
           "HF_DATASETS_OFFLINE": None, "STUDIO_CONFINED": None, "STUDIO_ALLOW_REMOTE_CODE": None,
           "STUDIO_ALLOWED_PATHS": None, "STUDIO_ALLOW_HUB": None}
    with running_studio(home, env=env) as (url, proc, log):
        yield Client(url, verbose=False), home


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder the studio was not allowed to read, holding a secret."""
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"instruction": "q", "output": "TOP-SECRET-VALUE"}) + "\n")
    return tmp_path


def job(**sections) -> str:
    cfg = example_config().model_dump(mode="json")
    for section, values in sections.items():
        cfg[section].update(values)
    return yaml.safe_dump(cfg)


def adapter_zip(path: Path, folder: str, meta: dict | None = None, extra: dict | None = None,
                base: str = "SmolLM2-135M-Instruct"):
    """The shared crafted zip, as the upload gradio_client sends."""
    return handle_file(str(conftest.adapter_zip(path, folder, meta, extra, base)))


def refused(client, *args, api_name: str) -> str:
    with pytest.raises(Exception) as e:
        client.predict(*args, api_name=api_name)
    assert "Traceback" not in str(e.value)
    return str(e.value)


# --- remote code -------------------------------------------------------------------------------------------------
def test_a_client_cannot_turn_remote_code_on(studio):
    client, home = studio
    text = job(model={"trust_remote_code": True})
    msg = refused(client, text, api_name="/submit_job")
    assert "model.trust_remote_code" in msg and "--allow-remote-code" in msg
    check = as_json(client.predict(text, api_name="/validate_config"))
    assert check["valid"] is False and "model.trust_remote_code" in check["error"]
    assert not any((home / "runs").iterdir())


def test_a_model_folder_from_an_upload_or_elsewhere_is_refused(studio, outside):
    """The attack: a config.json with an auto_map and a modeling_*.py uploaded, then named as the model."""
    client, _ = studio
    upload = gradio_upload_dir() / uuid.uuid4().hex
    for folder in (outside, upload):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "evil",
                                                        "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}))
        (folder / "modeling_evil.py").write_text("import os; os.system('touch /tmp/pwned')\n")
        msg = refused(client, job(model={"name_or_path": str(folder)}), api_name="/submit_job")
        assert "model.name_or_path: not a path this studio may read" in msg
    (upload / "config.json").unlink()
    (upload / "modeling_evil.py").unlink()
    upload.rmdir()


def test_an_imported_studio_json_cannot_turn_remote_code_on(studio, tmp_path):
    client, home = studio
    meta = {"config": {"model": {"name_or_path": "SmolLM2-135M-Instruct", "trust_remote_code": True}}}
    msg = refused(client, adapter_zip(tmp_path / "rc.zip", "rc", meta), "", api_name="/import_adapter")
    assert "trust_remote_code" in msg and not (home / "adapters" / "rc").exists()


# --- paths -------------------------------------------------------------------------------------------------------
def test_no_file_outside_the_roots_is_read_or_its_existence_told(studio, outside, tmp_path):
    client, _ = studio
    name = as_json(client.predict(adapter_zip(tmp_path / "e.zip", "probe"), "", api_name="/import_adapter"))["name"]
    answers = set()
    for path in (outside / "secret.jsonl", outside / "missing.jsonl", outside / "secret.csv", "/etc/hostname"):
        answers.add(refused(client, name, str(path), 2, 8, api_name="/evaluate"))
    assert len(answers) == 1, answers
    only = answers.pop()
    assert "TOP-SECRET" not in only and "data_path: not a path this studio may read" in only
    msg = refused(client, job(data={"path": str(outside / "secret.jsonl")}), api_name="/submit_job")
    assert "data.path: not a path this studio may read" in msg and "TOP-SECRET" not in msg
    msg = refused(client, job(data={"validation_path": str(outside / "missing.jsonl")}), api_name="/submit_job")
    assert "data.validation_path: not a path" in msg


def test_a_hub_id_from_an_imported_file_never_reaches_the_network(studio, trap, tmp_path):
    client, _ = studio
    z = adapter_zip(tmp_path / "hub.zip", "hub-base", base="someorg/not-a-cached-model")
    name = as_json(client.predict(z, "", api_name="/import_adapter"))["name"]
    msg = refused(client, name, "hello", 4, api_name="/generate")
    assert "someorg/not-a-cached-model" in msg and "does not download" in msg
    assert trap.requests == [], trap.requests


# --- imported evaluations and names ------------------------------------------------------------------------------
def test_an_imported_evaluation_is_never_served(studio, tmp_path):
    client, home = studio
    forged = json.dumps({"summary": {"win": 99, "tie": 0, "loss": 0}, "adapter": "forged"})
    meta = {"base_model": "SmolLM2-135M-Instruct", "eval": {"win": 99, "tie": 0, "loss": 0}}
    z = adapter_zip(tmp_path / "f.zip", "forged", meta, {"eval/0123456789abcdef0123.json": forged,
                                                          "tokenizer.json": "{}", "notes.txt": "x" * 4096})
    name = as_json(client.predict(z, "", api_name="/import_adapter"))["name"]
    folder = home / "adapters" / name
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "studio.json"]
    row = next(r for r in as_json(client.predict(api_name="/list_adapters")) if r["name"] == name)
    assert row["eval"] is None


@pytest.mark.parametrize("bad", ["evil\n", "tab\tname", "bell\x07"])
def test_names_with_control_characters_are_refused(studio, tmp_path, bad):
    client, home = studio
    msg = refused(client, adapter_zip(tmp_path / "n.zip", "named"), bad, api_name="/import_adapter")
    assert "adapter name" in msg
    assert not any(p.name.startswith(bad.rstrip()) for p in (home / "adapters").iterdir() if not p.name.startswith("."))
    msg = refused(client, yaml.safe_dump({"adapter_name": bad}), api_name="/submit_job")
    assert "adapter_name" in msg


# --- limits ------------------------------------------------------------------------------------------------------
def test_requests_over_the_limits_are_refused_with_the_field(studio, tmp_path):
    client, _ = studio
    msg = refused(client, "", "p" * (limits.MAX_PROMPT_CHARS + 1), 4, api_name="/generate")
    assert "prompt" in msg and str(limits.MAX_PROMPT_CHARS) in msg
    msg = refused(client, "", "hi", limits.MAX_NEW_TOKENS + 1, api_name="/generate")
    assert "max_new_tokens" in msg
    name = as_json(client.predict(adapter_zip(tmp_path / "l.zip", "limited"), "", api_name="/import_adapter"))["name"]
    msg = refused(client, name, "", 2, 100000, api_name="/evaluate")
    assert "max_new_tokens must be between 0 and 1024" in msg
    msg = refused(client, name, "", 10**6, 8, api_name="/evaluate")
    assert "max_examples must be between 0 and 1000" in msg
    msg = refused(client, job(data={"system_prompt": "s" * 100_000}), api_name="/submit_job")
    assert "data.system_prompt" in msg and "at most" in msg


def test_malformed_yaml_answers_invalid_instead_of_raising(studio):
    client, _ = studio
    duplicate = "adapter_name: a\nmodel:\n  trust_remote_code: false\n  trust_remote_code: true\n"
    check = as_json(client.predict(duplicate, api_name="/validate_config"))
    assert check["valid"] is False and "duplicate key 'trust_remote_code'" in check["error"] and "line 4" in check["error"]
    for deep in ("a: " + "[" * 5000 + "]" * 5000, "a: " + "{b: " * 3000 + "1" + "}" * 3000):
        check = as_json(client.predict(deep, api_name="/validate_config"))
        assert check["valid"] is False and "nested too deeply" in check["error"]
