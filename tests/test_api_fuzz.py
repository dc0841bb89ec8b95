"""Every named endpoint of a real studio, fed hostile strings (control characters, NUL, trailing newlines, 1 MB
values, deep YAML nesting, unicode tricks, path and template tricks): each answer is a valid result or an error
with a message, the server logs no traceback, and it keeps answering. One studio for the module; no job runs
(--no-scheduler), and no model is loaded (every hostile value is refused before one would be)."""
from __future__ import annotations

import json

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.studio_server import as_json, running_studio

MB = "x" * (1 << 20)
HOSTILE = [
    "", " ", "\x00", "name\x00.json", "adapter\n", "adapter\r\n", "\t\x0b\x0c", "\x1b[31mred\x1b[0m", "\x7f\x08",
    "../../../etc/passwd", "/etc/passwd", "~root/.ssh/id_rsa", "C:\\Windows\\win.ini", "file:///etc/passwd",
    "\u202eevil\u202c", "ａｄａｐｔｅｒ", "a\u200bb", "😀" * 10, "%s%n%x", "{{7*7}}", "${jndi:ldap://x/a}",
    "'; DROP TABLE jobs; --", "<script>alert(1)</script>", "-" * 300, MB,
]
HOSTILE_YAML = HOSTILE + [
    "[" * 5000, "{a: " * 3000, "- " * 5000 + "x", "a: &a [1]\nb: [*a, *a, *a]\n" + "c: " + "[*a]" * 10,
    "!!python/object/apply:os.system ['id']", "adapter_name: x\nadapter_name: y\n", "adapter_name: " + MB,
    "model:\n  trust_remote_code: true\n", "adapter_name: ok\n\x00", "\tadapter_name: x",
]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-studio")
    with running_studio(home, "--no-scheduler") as (url, proc, log):
        client = Client(url, verbose=False)
        yield client, log
        text = log.read_text(encoding="utf-8", errors="replace")
        assert "Traceback" not in text and "unexpected error" not in text, text[-4000:]


def answer(client: Client, *args, api_name: str):
    """('ok', result) or ('error', message); anything else (a dropped connection, a bare 'Error') fails the test."""
    try:
        return "ok", client.predict(*args, api_name=api_name)
    except AppError as e:
        message = str(e).strip()
        assert message and message.lower() not in ("error", "none"), f"{api_name}{args!r:.200}: bare error"
        assert "Traceback" not in message, message
        return "error", message


def short(x) -> str:
    return repr(x)[:80]


@pytest.mark.parametrize("api_name", ["/job_status", "/cancel_job", "/resume_job", "/sweep_status"])
def test_job_ids(studio, api_name):
    client, _ = studio
    for value in HOSTILE:
        kind, out = answer(client, value, api_name=api_name)
        assert kind == "error", f"{api_name}({short(value)}) answered {short(out)}"


@pytest.mark.parametrize("api_name", ["/delete_adapter", "/download_adapter"])
def test_adapter_names(studio, api_name):
    client, _ = studio
    for value in HOSTILE:
        kind, out = answer(client, value, api_name=api_name)
        assert kind == "error", f"{api_name}({short(value)}) answered {short(out)}"


def test_configs(studio):
    client, _ = studio
    queued = set()
    for value in HOSTILE_YAML:
        kind, out = answer(client, value, api_name="/validate_config")
        assert kind == "ok", f"/validate_config({short(value)}): {out}"
        assert json.loads(out)["valid"] in (True, False), short(value)
        kind, out = answer(client, value, api_name="/submit_job")
        if kind == "ok":  # a string that happens to be a valid config (an empty one is: every field has a default)
            queued.add(out)
    assert {j["id"] for j in as_json(client.predict(api_name="/list_jobs"))} == queued


def test_model_endpoints_refuse_before_loading(studio):
    client, log = studio
    for value in HOSTILE:
        if value.strip():  # a blank adapter means the base model, which would be loaded
            assert answer(client, value, "hi", 8, 0.0, 1.0, api_name="/generate")[0] == "error", short(value)
        assert answer(client, value, "", 0, 0, api_name="/evaluate")[0] == "error", short(value)
    for bad in ([-1, 0.0, 1.0], [10**12, 0.0, 1.0], [8, -1.0, 1.0], [8, 1e308, 1.0], [8, 0.0, 0.0], [8, 0.0, 7.0]):
        assert answer(client, "", "hi", *bad, api_name="/generate")[0] == "error", bad
    assert "loading" not in log.read_text().lower()


def test_imports(studio, tmp_path):
    client, _ = studio
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    for name in HOSTILE:
        assert answer(client, handle_file(str(junk)), name, api_name="/import_adapter")[0] == "error", short(name)
    assert as_json(client.predict(api_name="/list_adapters")) == []


def test_sweep_configs(studio):
    """No hostile string is a sweep (a sweep needs a base job), and a base that names a file outside the allowed
    folders is refused without saying whether the file exists."""
    client, _ = studio
    before = as_json(client.predict(api_name="/list_jobs"))
    for value in HOSTILE_YAML + ["base: /etc/passwd\n", "base: ../../../etc/shadow\nspace: {r: [8]}\n"]:
        kind, out = answer(client, value, api_name="/submit_sweep")
        assert kind == "error", f"/submit_sweep({short(value)}) answered {short(out)}"
        assert "root:" not in out
    assert as_json(client.predict(api_name="/list_jobs")) == before
