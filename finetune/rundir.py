"""The run folder, STUDIO_HOME/runs/<job_id>/: the one interface between a job's process and the rest of the studio.

    job.yaml              the job's validated spec
    status.json           what the run is doing now (phase, step, total_steps, loss, error ...), replaced atomically
    metrics.jsonl         one JSON object per logged step or evaluation, appended
    train.log             the process's stdout and stderr, with a header line per launch attempt
    checkpoints/checkpoint-<step>/   what --resume continues from (complete once renamed into place)

Writers (the job's process, the job store) and readers (the store, the Jobs tab, the API, the `jobs` CLI) live here,
so the format has one definition. No torch import: the UI process reads these files.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from finetune.fsutil import write_json_atomic, write_text_atomic

JOB_YAML = "job.yaml"
STATUS = "status.json"
METRICS = "metrics.jsonl"
LOG = "train.log"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
ATTEMPT_HEADER = "=== studio: attempt"
LOG_TAIL_LINES = 40
# The one definition of a run's final training loss, used by the Jobs view, studio.json and so the Adapters tab.
FINAL_LOSS_WINDOW = 5
FINAL_LOSS_LABEL = f"final loss (mean of the last {FINAL_LOSS_WINDOW} logged steps)"
# How the model card and the Adapters table write a run's throughput and peak memory (the same numbers in both)
RATE_FORMAT, MIB_FORMAT = ",.2f", ",.0f"


# --- writers --------------------------------------------------------------------------------------------------
class Status:
    """status.json: what the run is doing now. Only the main process writes it."""

    def __init__(self, run_dir: Path, adapter_name: str, enabled: bool = True):
        self.path = Path(run_dir) / STATUS
        self.enabled = enabled
        now = time.time()
        self.data = {"phase": "loading", "step": 0, "total_steps": 0, "epoch": 0.0, "loss": None, "eval_loss": None,
                     "tokens_per_second": None, "peak_memory_mb": None, "eta_seconds": None, "started_at": now,
                     "updated_at": now, "adapter_name": adapter_name, "error": None, "pid": os.getpid()}

    def update(self, **values) -> None:
        self.data.update(values, updated_at=time.time())
        if self.enabled:
            write_json_atomic(self.path, self.data)


def write_failure(run_dir: Path, message: str) -> None:
    """A process that fails before it can train says why, where the job store reads it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    Status(run_dir, "").update(phase="failed", error=message)


class Metrics:
    """metrics.jsonl: appended one line at a time, flushed so the UI can tail it."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop the rows logged after the checkpoint: they are about to be logged again."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill that ended the previous attempt
            if row.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def begin_attempt(run_dir: Path, attempt: int, checkpoint: str | None, command: str, spec_text: str) -> None:
    """Prepare the folder for a launch: job.yaml back from the store if the folder was deleted by hand, the previous
    attempt's curve set aside when starting over, and a header in train.log naming the attempt and its command."""
    run_dir = Path(run_dir)
    job_yaml = run_dir / JOB_YAML
    if not job_yaml.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        job_yaml.write_text(spec_text, encoding="utf-8")
    if attempt > 1 and not checkpoint and (run_dir / METRICS).exists():
        os.replace(run_dir / METRICS, run_dir / f"metrics.attempt{attempt - 1}.jsonl")
    header = f"\n{ATTEMPT_HEADER} {attempt}" + (f", resuming from {checkpoint}" if checkpoint else "") + \
             f" at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n$ {command}\n"
    with open(run_dir / LOG, "ab") as log:
        log.write(header.encode("utf-8"))


# --- readers --------------------------------------------------------------------------------------------------
def read_status(run_dir: Path) -> dict:
    """status.json; {} if absent or unreadable."""
    try:
        data = json.loads((Path(run_dir) / STATUS).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows; a half-written last line (the writer is mid-write) or a torn line is skipped."""
    try:
        text = (Path(run_dir) / METRICS).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def _thin(points: dict[int, float], max_points: int) -> list[list]:
    out = [[s, points[s]] for s in sorted(points)]
    if len(out) > max_points:  # thin a long curve for the plot, keeping the last point
        stride = -(-len(out) // max_points)
        out = out[::stride] + ([out[-1]] if (len(out) - 1) % stride else [])
    return out


def histories(rows: list[dict], max_points: int = 2000) -> tuple[list[list], list[list]]:
    """[[step, loss], ...] and [[step, eval_loss], ...]. A resumed run logs the steps after its checkpoint again:
    the later value of a step wins, so the curve continues instead of zig-zagging."""
    loss: dict[int, float] = {}
    evl: dict[int, float] = {}
    for r in rows:
        step = int(r["step"])
        if isinstance(r.get("loss"), (int, float)):
            loss[step] = float(r["loss"])
        if isinstance(r.get("eval_loss"), (int, float)):
            evl[step] = float(r["eval_loss"])
    return _thin(loss, max_points), _thin(evl, max_points)


def objective_metrics(rows: list[dict]) -> dict:
    """The latest value of each objective's own metric (names with a '/': rewards/margins, distill/kl ...)."""
    out: dict = {}
    for r in rows:
        out.update({k: v for k, v in r.items() if "/" in k and _number(v) is not None})
    return out


def final_loss(loss_history: list[list]) -> float | None:
    """Mean training loss of the last FINAL_LOSS_WINDOW logged steps ([[step, loss], ...]), rounded as logged."""
    last = [loss for _, loss in loss_history[-FINAL_LOSS_WINDOW:]]
    return round(sum(last) / len(last), 6) if last else None


def log_tail(run_dir: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 65536) -> str:
    """The last lines of train.log, reading only its end. Progress-bar carriage returns keep their last frame."""
    try:
        with open(Path(run_dir) / LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    out = [ln.rsplit("\r", 1)[-1] if "\r" in ln.rstrip("\r") else ln.rstrip("\r") for ln in text.split("\n")]
    if size > max_bytes:
        out = out[1:]  # the first line was cut by the seek
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out[-lines:])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    found = []
    for p in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*"):
        m = CHECKPOINT_RE.fullmatch(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> str | None:
    """Name of the newest complete checkpoint (what --resume continues from), if any."""
    found = list_checkpoints(run_dir)
    return found[-1][1].name if found else None


# --- the one view of a job ----------------------------------------------------------------------------------------
def _number(x) -> int | float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _numbers(status: dict, rows: list[dict], key: str):
    """The status's value, else the latest metrics row that has one."""
    if _number(status.get(key)) is not None:
        return status[key]
    return next((r[key] for r in reversed(rows) if _number(r.get(key)) is not None), None)


def _rank_numbers(value) -> list | None:
    """A per-process list from status.json (several processes only), each entry a number or None."""
    if not isinstance(value, list) or len(value) < 2:
        return None
    return [_number(v) for v in value[:4096]]


def view(row: dict, planned_steps: int | None = None, command: str | None = None, label: str | None = None,
         detail: bool = True) -> dict:
    """What every client shows for a job (the Jobs tab, /job_status, `jobs show` and `jobs list`): the store's row
    joined with its run folder. planned_steps, command and label come from the job's spec (its kind knows them)
    for a job that has not said so itself yet. detail=False skips the curves and the log (a table of many jobs)."""
    run_dir = Path(row["run_dir"])
    state = row["state"]
    status = read_status(run_dir) if state != "queued" or row.get("attempts") else {}
    rows = read_metrics(run_dir) if detail else []
    step = int(_number(status.get("step")) or max((int(r["step"]) for r in rows), default=0))
    total = int(_number(status.get("total_steps")) or planned_steps or 0)
    progress = 1.0 if state == "completed" else (min(1.0, step / total) if total else 0.0)
    elapsed = ((row["finished_at"] or time.time()) - row["started_at"]) if row.get("started_at") else None
    out = {
        "id": row["id"], "name": row["name"], "kind": row.get("kind", "train"), "state": state,
        "step": step, "total_steps": total, "progress": round(progress, 4),
        "loss": _numbers(status, rows, "loss"), "eval_loss": _numbers(status, rows, "eval_loss"),
        "tokens_per_second": _numbers(status, rows, "tokens_per_second"),
        "peak_memory_mb": _number(status.get("peak_memory_mb")),
        "rank_peak_memory_mb": _rank_numbers(status.get("rank_peak_memory_mb")),
        "eta_seconds": _number(status.get("eta_seconds")) if state == "running" else (0.0 if state == "completed" else None),
        "elapsed_seconds": round(elapsed, 1) if elapsed is not None else None,
        # a job its sweep stopped early says so, whatever its process last wrote; launched but silent so far: it
        # is loading (a phase never reads "running" before "loading")
        "phase": "pruned" if row.get("reason") == "pruned" else str(status.get("phase") or ("loading" if state == "running" else state)),
        "reason": row.get("reason"), "parent": row.get("parent"),
        "adapter_name": row.get("adapter_name") or label,
        "error": row.get("error"), "command": command or row.get("command"),
        "created_at": row["created_at"], "started_at": row.get("started_at"), "finished_at": row.get("finished_at"),
        "attempts": row.get("attempts"), "resumed_from": row.get("resumed_from"), "run_dir": row["run_dir"],
        "pid": row.get("pid"), "exit_code": row.get("exit_code"),
    }
    if detail:
        out["objective_metrics"] = objective_metrics(rows)
        out["loss_history"], out["eval_history"] = histories(rows)
        out["final_loss"] = final_loss(out["loss_history"])
        out["log_tail"] = log_tail(run_dir)
    return out
