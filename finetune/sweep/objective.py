"""A finished trial job's objective value: its validation loss, or a metric of its end-of-run evaluation."""
from __future__ import annotations

import math
from pathlib import Path

from finetune import rundir


def objective_value(objective: str, row: dict) -> float | None:
    """None when the job did not produce the value (the trial is then told it failed)."""
    if objective == "val_loss":
        value = rundir.read_status(Path(row["run_dir"])).get("eval_loss")
        if value is None:
            losses = [r["eval_loss"] for r in rundir.read_metrics(Path(row["run_dir"])) if "eval_loss" in r]
            value = losses[-1] if losses else None
    else:
        from finetune.store import adapters

        try:
            meta = adapters.get_adapter(row["adapter_name"] or "")
        except Exception:  # noqa: BLE001 - no adapter: no value
            return None
        value = (meta.get("eval") or {}).get("metrics", {}).get("adapter", {}).get(objective)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
