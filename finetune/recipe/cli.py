"""`python -m finetune train`: train a job config in the foreground.

    python -m finetune train JOB.yaml [--set section.field=value ...] [--run-dir DIR] [--resume]
    python -m accelerate.commands.launch --config_file DIR/accelerate.yaml -m finetune train JOB.yaml --run-dir DIR
                                                      (what the job runner runs: finetune/jobs/launch.py)
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

from finetune import policy
from finetune.config import ConfigError, JobConfig
from finetune.errors import expected, plain_message
from finetune.paths import adapters_dir, runs_dir
from finetune.plan import oom_hint
from finetune.recipe import run
from finetune.rundir import write_failure


def default_run_dir(adapter_name: str) -> Path:
    return runs_dir() / f"cli-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{adapter_name}"


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune train", description="train a job config in the foreground")
    p.add_argument("config", help="job YAML (python -m finetune config --example prints one)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field (repeatable)")
    p.add_argument("--run-dir", help="where status.json, metrics.jsonl and checkpoints go (default: STUDIO_HOME/runs/cli-<time>-<adapter>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = JobConfig.load(a.config)
        if a.set:
            config = config.with_overrides(a.set)
        if policy.confined():  # launched by the studio: the job YAML came from a client
            policy.check_job(config)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if a.run_dir:  # the job store reads the reason from here
            write_failure(Path(a.run_dir), str(e))
        return 1
    run_dir = Path(a.run_dir) if a.run_dir else default_run_dir(config.adapter_name)
    print(f"run folder: {run_dir}", file=sys.stderr)
    try:
        meta = run(config, run_dir, resume=a.resume)
    except Exception as e:
        message = plain_message(e) + oom_hint(config, e)
        if not expected(e):  # the traceback helps whoever reads train.log
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if meta:  # the main process
        m = meta["metrics"]
        print(f"adapter {config.adapter_name}: loss {m['first_loss']:.4f} -> {m['final_loss']:.4f} in {m['steps']} steps "
              f"({m['runtime_s']} s, {m['tokens_per_second']} tokens/s), stored in {adapters_dir() / config.adapter_name}")
    return 0
