"""The process side of a job: the devices, starting it detached, watching and stopping its process group,
and why it failed (from what it wrote into its run folder, finetune/rundir.py).

No torch import here: the studio UI imports this module, and a job must survive the UI (and the UI the job).
Liveness is judged from /proc, never from being the parent: after a studio restart the training process is
somebody else's child, and a pid may have been reused by an unrelated program in the meantime.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from functools import lru_cache
from pathlib import Path

from finetune import rundir
from finetune.errors import disk_full_message, missing_module_message, oom_message
from finetune.paths import PROJECT_ROOT
from finetune.rundir import ATTEMPT_HEADER


# --- devices and launching -------------------------------------------------------------------------
@lru_cache(maxsize=1)
def host_gpus() -> tuple[str, ...]:
    """The GPUs jobs may use, decided without importing torch (seconds of import in the UI process):
    CUDA_VISIBLE_DEVICES when set, else every GPU `nvidia-smi -L` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = tuple(v.strip() for v in visible.split(",") if v.strip())
        return () if not ids or ids[0] in ("-1", "none", "NoDevFiles") else ids
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    return tuple(str(i) for i, line in enumerate(ln for ln in out.stdout.splitlines() if ln.startswith("GPU ")))


def cuda_available() -> bool:
    return bool(host_gpus())


def command_string(cmd: list[str]) -> str:
    return shlex.join(cmd)


def launch(cmd: list[str], run_dir: Path, job_id: str, home: Path,
           devices: tuple[str, ...] | None = None) -> subprocess.Popen:
    """Start the job in its own session (so it outlives the studio and can be stopped as one process group),
    appending its stdout and stderr to run_dir/train.log. devices: the GPUs it may see (None: leave
    CUDA_VISIBLE_DEVICES as it is; () hides every GPU)."""
    env = dict(os.environ)
    env.update(STUDIO_JOB_ID=job_id, STUDIO_HOME=str(home), PYTHONUNBUFFERED="1")
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(run_dir / rundir.LOG, "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=str(PROJECT_ROOT), start_new_session=True, close_fds=True)


# --- processes -----------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) from /proc/<pid>/stat, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # comm (field 2) may contain spaces and parentheses: the fields after the last ')' are fixed.
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[2])
    except (IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _runs_job(pid: int, run_dir: str | Path) -> bool:
    """Whether the process's arguments include the job's run folder: every job kind's command passes it, and an
    unrelated process that reused the pid does not (a `tail -f` of its log names a file inside it, not the folder)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return os.fsencode(str(run_dir)) in args


def pid_alive(pid: int | None) -> bool:
    """True for a running process; False for none, a zombie (exited, not yet reaped) or one we may not see."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists but is another user's: _is_ours rejects it below
    st = _proc_stat(pid)
    if st is None:
        return not Path("/proc").is_dir()  # no /proc (not Linux): trust os.kill
    return st[0] not in ("Z", "X")


def is_ours(pid: int, run_dir: str | Path) -> bool:
    """A live process that really is this job's (not a reused pid): its command line names finetune and the run folder."""
    if not pid_alive(pid):
        return False
    if not Path("/proc").is_dir():
        return True
    return _runs_job(pid, run_dir)


def group_members(pgid: int | None, run_dir: str | Path) -> list[int]:
    """Live processes of the job's process group that belong to the job.

    The group, not only the launcher's pid: if the launcher dies, its training child may still be running
    (and may still finish), so the job is over only when no process of it is left."""
    if not pgid or pgid <= 0:
        return []
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        st = _proc_stat(pid)
        if st and st[1] == pgid and st[0] not in ("Z", "X") and _runs_job(pid, run_dir):
            members.append(pid)
    return members


def alive(row: dict) -> bool:
    """Whether a running job still has a process: ours, or re-attached after a restart."""
    return bool(group_members(row["pgid"], row["run_dir"]) or is_ours(row["pid"], row["run_dir"]))


def group_of(proc: subprocess.Popen) -> int:
    try:
        return os.getpgid(proc.pid)
    except ProcessLookupError:
        return proc.pid  # start_new_session: the launcher leads its own group


class Children:
    """The processes this studio process launched: their exit codes (the truth for our own children), and reaping,
    so that they do not linger as zombies."""

    def __init__(self):
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def add(self, job_id: str, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs[job_id] = proc

    def pop(self, job_id: str) -> None:
        with self._lock:
            self._procs.pop(job_id, None)

    def poll(self) -> dict[str, int]:
        """Exit codes of the children that have exited (reaping them)."""
        with self._lock:
            procs = list(self._procs.items())
        return {job_id: rc for job_id, proc in procs if (rc := proc.poll()) is not None}

    def exit_code(self, job_id: str, timeout: float = 5) -> int | None:
        """The exit code of our child (None if the job is not ours). The /proc scan can miss a process in the middle
        of exiting (seen under load), so an exit is given `timeout` to be reaped; TimeoutError if it is still alive."""
        with self._lock:
            proc = self._procs.get(job_id)
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"job {job_id} is still running") from None


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(pgid: int, run_dir: str | Path, grace_s: float = 10.0, reap=None) -> str:
    """SIGTERM the whole group (plus SIGCONT, so a stopped process gets it), SIGKILL whatever is left after grace_s.
    reap() is called while waiting so that our own exited children do not linger as zombies.
    Returns "none" (nothing was running), "term" or "kill" (what it took)."""
    if not group_members(pgid, run_dir):
        return "none"
    signal_group(pgid, signal.SIGTERM)
    signal_group(pgid, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if reap:
            reap()
        if not group_members(pgid, run_dir):
            return "term"
        time.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and group_members(pgid, run_dir):
        if reap:
            reap()
        time.sleep(0.05)
    return "kill"


# --- why a job failed, in plain words --------------------------------------------------------------
_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt))(?::\s*(.*))?$")


def diagnose(status: dict, tail: str, returncode: int | None) -> str:
    """One plain sentence for a failed job: the trainer's own error when it wrote one, else what the log shows.

    Only the final lines of a traceback (and the trainer's `error: ...` line) count as evidence: libraries log
    harmless warnings such as "No module named 'kernels'" on every run."""
    if status.get("phase") == "failed" and status.get("error"):
        return str(status["error"]).strip()
    if ATTEMPT_HEADER in tail:  # only the latest attempt's output is about this failure
        tail = tail[tail.rindex(ATTEMPT_HEADER):]
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    low = "\n".join(lines).lower()
    if returncode in (-9, 137) or "died with <signals.sigkill" in low or any(ln == "Killed" for ln in lines):
        return "the training process was killed (SIGKILL or out of host memory)"
    if returncode in (-15, 143) or "died with <signals.sigterm" in low:
        return "the training process was terminated (SIGTERM) before it finished"
    evidence = [ln for ln in lines if ln.startswith("error: ") or (_EXC_LINE.match(ln) and not ln.startswith(
        ("subprocess.CalledProcessError", "CalledProcessError")))]
    text = "\n".join(evidence)
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return oom_message(text)
    for ln in reversed(evidence):
        if "DataError" in ln:
            return "bad training data: " + re.sub(r"^.*?DataError:\s*", "", ln)
        if "ConfigError" in ln:
            return "invalid job config: " + re.sub(r"^.*?ConfigError:\s*", "", ln)
        m = re.search(r"No module named '?([\w.]+)", ln)
        if m:
            return missing_module_message(m.group(1))
        if "no space left on device" in ln.lower():
            return disk_full_message()
    errs = [ln for ln in evidence if ln.startswith("error: ")]
    if errs:
        return errs[-1].removeprefix("error: ")
    if evidence:
        return f"training failed: {evidence[-1]}"
    phase = status.get("phase")
    where = f" (last phase {phase}, step {status.get('step', 0)} of {status.get('total_steps', '?')})" if phase else ""
    code = f" with exit code {returncode}" if returncode is not None else ""
    last = " | ".join(lines[-5:])
    return f"the training process ended{code} before finishing{where}" + (f"; last log lines: {last}" if last else "")
