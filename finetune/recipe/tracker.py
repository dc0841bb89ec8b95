"""What a training run reports while it runs: status.json and metrics.jsonl (through finetune/rundir.py), the console
progress bar, the throughput window between logged steps and the run's clock (carried across resumes)."""
from __future__ import annotations

import time
from pathlib import Path

from finetune.recipe.checkpoints import Progress
from finetune.rundir import Metrics, Status, final_loss, histories, read_metrics


def memory_mb() -> tuple[float | None, float | None]:
    """(now, peak) in MiB: CUDA allocated memory on a GPU, else the process's resident set from /proc."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    now = peak = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return now, peak


class RunTracker:
    """Status, metrics rows and the progress bar of one run. Only the main process writes (enabled)."""

    def __init__(self, run_dir: Path | None, adapter_name: str, enabled: bool):
        self.run_dir = run_dir
        self.status = Status(run_dir or Path("."), adapter_name, enabled=enabled)
        self.metrics = Metrics(run_dir or Path("."), enabled=enabled)
        self.enabled = enabled
        self.rank_peaks: list | None = None  # each process's peak memory, when there are several

    def start(self, state: Progress, total_steps: int, steps_per_epoch: int) -> None:
        from tqdm.auto import tqdm

        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.status.update(phase="training", step=state.global_step, total_steps=total_steps,
                           epoch=state.global_step / steps_per_epoch)
        # every step drawn (miniters=1, no time throttle): the log's bar never lags status.json's step, which the
        # Jobs tab's progress bar shows beside it
        self.bar = tqdm(total=total_steps, initial=state.global_step, desc="training", unit="step",
                        disable=not self.enabled, dynamic_ncols=True, miniters=1, mininterval=0)
        self.session_start, self.session_start_step = time.time(), state.global_step
        self.window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.time()}

    def record(self, state: Progress, loss: float, tokens: int, ranks=None) -> None:
        """One optimizer step done (state already advanced). loss: over every process; tokens: summed over them;
        ranks: the step's per-process numbers (recipe.distributed.RankStep), shown when there are several."""
        if state.first_loss is None:
            state.first_loss = loss
        state.losses = (state.losses + [[state.global_step, loss]])[-20:]
        self.window["loss"] += loss
        self.window["steps"] += 1
        self.window["tokens"] += tokens
        if ranks is not None and len(ranks.rank_loss) > 1:
            self.window["ranks"] = self.window.get("ranks", []) + [ranks]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def log_step(self, state: Progress, learning_rate: float, grad_norm: float, extra: dict | None = None) -> None:
        """metrics.jsonl's row for the steps since the last one, and status.json."""
        now, w = time.time(), self.window
        tps = w["tokens"] / max(now - w["t0"], 1e-9)
        state.train_tokens += w["tokens"]
        mem, peak = memory_mb()
        per_step = (now - self.session_start) / max(1, state.global_step - self.session_start_step)
        row = {"step": state.global_step, "loss": round(w["loss"] / w["steps"], 6),
               "learning_rate": learning_rate, "grad_norm": round(grad_norm, 6),
               "tokens_per_second": round(tps, 2), "memory_mb": round(mem, 1) if mem else None,
               "elapsed_s": round(state.elapsed_s + now - self.session_start, 2), **(extra or {})}
        per_rank = rank_columns(w.get("ranks", []))
        if per_rank:
            row.update(per_rank)
            row["memory_mb"] = max((m for m in per_rank["rank_memory_mb"] if m is not None), default=None)
            self.rank_peaks = per_rank["rank_peak_memory_mb"]
            peak = max((m for m in self.rank_peaks if m is not None), default=peak)
        self.metrics.write(row)
        self.status.update(step=state.global_step, epoch=round(state.global_step / self.steps_per_epoch, 4),
                           loss=row["loss"], tokens_per_second=row["tokens_per_second"],
                           peak_memory_mb=round(peak, 1) if peak else None,
                           rank_peak_memory_mb=per_rank.get("rank_peak_memory_mb"),
                           eta_seconds=round(per_step * (self.total_steps - state.global_step), 1))
        self.window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": now}

    def log_eval_loss(self, step: int, eval_loss: float | None, update_status: bool = True) -> None:
        if eval_loss is not None:
            self.metrics.write({"step": step, "eval_loss": round(eval_loss, 6)})
            if update_status:
                self.status.update(eval_loss=round(eval_loss, 6))

    def elapsed(self, state: Progress) -> float:
        """Seconds of training in this run, earlier attempts included."""
        return state.elapsed_s + time.time() - self.session_start

    def snapshot(self, state: Progress) -> dict:
        """trainer_state.json for a checkpoint taken now."""
        return {**state.__dict__, "elapsed_s": self.elapsed(state), "total_steps": self.total_steps,
                "train_tokens": state.train_tokens + self.window["tokens"]}

    def close(self) -> None:
        self.bar.close()

    def summary(self, state: Progress, eval_loss: float | None) -> dict:
        """studio.json's metrics: losses, steps, runtime, throughput and peak memory of the whole run."""
        import torch

        runtime = self.elapsed(state)
        _, peak = memory_mb()
        rank_peaks = self.rank_peaks
        if rank_peaks:
            peak = max((m for m in rank_peaks if m is not None), default=peak)
        # from the logged rows, as the Jobs view computes it, so the two tabs show the same number
        logged = histories(read_metrics(self.run_dir))[0] if self.run_dir else []
        return {
            "first_loss": state.first_loss,
            "final_loss": final_loss(logged or state.losses),
            "last_step_loss": state.losses[-1][1] if state.losses else None,
            "eval_loss": eval_loss,
            "steps": state.global_step,
            "epochs": round(state.global_step / self.steps_per_epoch, 4),
            "runtime_s": round(runtime, 2),
            "train_tokens": state.train_tokens,
            "tokens_per_second": round(state.train_tokens / runtime, 2) if runtime > 0 else None,
            "seconds_per_step": round(runtime / max(1, state.global_step), 3),
            "peak_memory_mb": round(peak, 1) if peak else None,
            "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "process_rss",
            "rank_peak_memory_mb": rank_peaks,
        }


def rank_columns(steps: list) -> dict:
    """metrics.jsonl's per-process columns for the steps since the last row (RankStep each): each rank's mean loss
    and label tokens over those steps, and its memory at the last one. Empty for one process."""
    if not steps:
        return {}
    n = len(steps)
    losses = [[s.rank_loss[r] for s in steps] for r in range(len(steps[0].rank_loss))]
    return {
        "rank_loss": [round(sum(v) / n, 6) if None not in v else None for v in losses],
        "rank_label_tokens": [sum(s.rank_label_tokens[r] for s in steps) for r in range(len(losses))],
        "rank_memory_mb": steps[-1].rank_memory_mb,
        "rank_peak_memory_mb": steps[-1].rank_peak_memory_mb,
        "num_processes": len(losses),
    }
