"""The login: its secret comes from a file only its owner can read or from the environment (never the command line,
where every user of the machine can read it), and password guessing is slowed per client address, with each failure
logged without what was typed. One studio with a login for the module."""
from __future__ import annotations

import http.client
import os
import subprocess
import sys
import urllib.parse

import pytest
from gradio_client import Client

import launch
from app.http_guard import LoginThrottle
from tests.studio_server import ROOT, as_json, free_port, running_studio, studio_env

USER, PASSWORD = "alice", "s3cret-Horse-battery"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    home = tmp_path_factory.mktemp("login-studio")
    secret = home / "auth.txt"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    secret.chmod(0o600)
    with running_studio(home, "--no-scheduler", "--auth-file", str(secret)) as (url, proc, log):
        yield url, proc, log


def login(url: str, password: str, source: str = "127.0.0.1") -> tuple[int, str, dict]:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        body = urllib.parse.urlencode({"username": USER, "password": password})
        conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace"), dict(r.getheaders())
    finally:
        conn.close()


def test_anonymous_client_is_refused_and_the_user_gets_in(studio):
    url, proc, _ = studio
    with pytest.raises(Exception):
        Client(url, verbose=False).predict(api_name="/list_jobs")
    assert as_json(Client(url, auth=(USER, PASSWORD), verbose=False).predict(api_name="/list_jobs")) == []
    cmdline = open(f"/proc/{proc.pid}/cmdline", "rb").read().decode()
    assert PASSWORD not in cmdline and "--auth-file" in cmdline


def test_repeated_failed_logins_lock_the_client_out(studio):
    url, _, log = studio
    guesser = "127.0.0.2"  # its own loopback address: the lockout is per client and must not hit the other tests
    guesses = [f"guess-{i}-Zq" for i in range(LoginThrottle.FREE_FAILURES)]
    for guess in guesses:
        status, _, _ = login(url, guess, guesser)
        assert status in (400, 401), status
    status, text, headers = login(url, PASSWORD, guesser)  # even the right password waits now
    assert status == 429, (status, text)
    assert "try again in" in text and int(headers.get("retry-after", "0")) > 0
    assert login(url, PASSWORD)[0] == 200  # another address is not locked out
    lines = [line for line in log.read_text().splitlines() if "login" in line]
    assert sum(f"failed login from {guesser}" in line for line in lines) == len(guesses)
    assert any(f"login from {guesser} refused" in line for line in lines)
    assert not any(g in log.read_text() for g in guesses) and PASSWORD not in log.read_text()


def run_launch(tmp_path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "--port", str(free_port()), *args], cwd=ROOT,
                          env={**studio_env(tmp_path), **(env or {})}, capture_output=True, text=True, timeout=60)


def test_password_on_the_command_line_is_refused(tmp_path):
    r = run_launch(tmp_path, "--auth", f"{USER}:{PASSWORD}")
    assert r.returncode == 2
    assert "--auth-file" in r.stderr and "STUDIO_AUTH" in r.stderr and "visible to every user" in r.stderr


def test_auth_file_others_can_read_is_refused(tmp_path):
    secret = tmp_path / "auth.txt"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    secret.chmod(0o644)
    r = run_launch(tmp_path, "--auth-file", str(secret))
    assert r.returncode == 2 and "chmod 600" in r.stderr and PASSWORD not in r.stderr
    secret.chmod(0o600)
    secret.write_text(f"{USER}:{PASSWORD}\nbob:other\n")
    r = run_launch(tmp_path, "--auth-file", str(secret))
    assert r.returncode == 2 and "one line" in r.stderr and PASSWORD not in r.stderr


def test_login_from_the_environment_is_not_passed_on(monkeypatch):
    monkeypatch.setenv("STUDIO_AUTH", f"{USER}:{PASSWORD}")
    assert launch.load_auth(launch.parse_args([])) == (USER, PASSWORD)
    assert "STUDIO_AUTH" not in os.environ  # training processes started by the studio do not inherit it
    monkeypatch.setenv("STUDIO_AUTH", "no-colon")
    with pytest.raises(SystemExit, match="user:password"):
        launch.load_auth(launch.parse_args([]))
