"""Start a real studio (launch.py in its own process group) on a free port with an isolated STUDIO_HOME, for the
gradio_client and browser tests. The model cache is shared with the rest of the suite (converted once)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def as_json(x):
    """A structured API result: the studio sends JSON text (gradio_client would mistake objects for files)."""
    return json.loads(x) if isinstance(x, str) else x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def studio_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(STUDIO_HOME=str(home), STUDIO_ADAPTERS_DIR=str(home / "adapters"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("STUDIO_MODEL_CACHE", str(ROOT / "studio_data" / "models"))
    return env


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the studio exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    try:
        wait_for(answers, timeout, f"the studio to answer on {url}", interval=0.5)
    except AssertionError:
        raise TimeoutError(f"the studio did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}") from None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@contextmanager
def running_studio(home: Path, *args: str, port: int | None = None, env: dict | None = None):
    """Yields (url, process, log path). Training jobs run in their own sessions and are cancelled by the tests
    that start them; the studio itself is stopped with its process group. `env` changes the studio's environment
    (a value None removes the variable)."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = home / "studio.log"
    full_env = studio_env(home)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--host", "127.0.0.1", "--port", str(port), *args],
                                cwd=str(ROOT), env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url, proc, log)
        yield url, proc, log
    finally:
        stop(proc)
