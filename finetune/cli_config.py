"""`python -m finetune config --example | --validate FILE [--set k=v ...]`."""
from __future__ import annotations

import argparse
import sys

from finetune.config import ConfigError, JobConfig, example_config


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune config")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--example", action="store_true", help="print a complete default config that trains as it is")
    g.add_argument("--validate", metavar="FILE", help="validate a job YAML and print it normalised")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    a = p.parse_args(argv)
    try:
        cfg = example_config() if a.example else JobConfig.load(a.validate)
        if a.set:
            cfg = cfg.with_overrides(a.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(cfg.to_yaml())
    return 0
