"""python -m finetune export NAME --format hf|gguf [--quant ...]: export in the foreground, print the manifest's
paths as JSON."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from finetune.export.store import DEFAULT_QUANT, FORMATS, ExportError


def _stderr_progress(message: str, step: int, total: int) -> None:
    print(f"[{step}/{total}] {message}", file=sys.stderr, flush=True)


def summary(manifest: dict) -> dict:
    """What the CLI and the API return: where the export is and each file's path, size and sha256."""
    folder = manifest["path"]
    return {"adapter": manifest["adapter"], "format": manifest["format"], "quant": manifest["quant"], "path": folder,
            "files": [{**f, "path": f"{folder}/{f['path']}"} for f in manifest["files"]],
            "merge": manifest.get("merge"), "export_seconds": manifest.get("export_seconds")}


def cli(argv: list[str]) -> int:
    quants = sorted({q for qs in FORMATS.values() for q in qs})
    p = argparse.ArgumentParser(prog="python -m finetune export", description=__doc__)
    p.add_argument("name", help="the adapter to export")
    p.add_argument("--format", default="hf", help=f"one of {', '.join(FORMATS)} (default hf)")
    p.add_argument("--quant", help="hf: " + "|".join(FORMATS["hf"]) + f" (default {DEFAULT_QUANT['hf']}); gguf: "
                   + "|".join(FORMATS["gguf"]) + f" (default {DEFAULT_QUANT['gguf']}). All: {', '.join(quants)}")
    p.add_argument("--reserve-bytes", type=int, default=0,
                   help="free disk to leave after the export; refused up front when it would not fit")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from finetune.export.exporter import run_export

    try:
        manifest = run_export(a.name, a.format, a.quant, _stderr_progress, a.reserve_bytes)
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary(manifest), indent=2))
    return 0
