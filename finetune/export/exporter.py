"""One export from start to finish: check the request and the free disk space, merge (and convert to GGUF) into a
staging folder, write the manifest, publish. Used in the foreground by the CLI and in the background by the export
job; both report progress through the same callback (message, step, total).
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from finetune.export.store import (ExportError, check_request, export_path, exports_dir, publish, staging_dir,
                                   write_manifest)

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]

_BYTES_PER_PARAM = {"bf16": 2.0, "f16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q4_0": 34 / 32}  # q4_0 keeps embeddings at q8_0
_MARGIN = 1.05
_MARGIN_BYTES = 16 * 2**20


def _log_progress(message: str, step: int, total: int) -> None:
    log.info("%s (%d/%d)", message, step, total)


def base_parameters(adapter: str) -> int:
    """The base model's parameter count, from its weight files' sizes and dtype (no weights loaded)."""
    from finetune.export.merge import adapter_source
    from finetune.model import resolve_model

    _, _, model_cfg = adapter_source(adapter)
    folder = Path(resolve_model(model_cfg.name_or_path, model_cfg.revision))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    per = 4 if "32" in dtype else 2
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) // per


def required_bytes(adapter: str, fmt: str, quant: str) -> int:
    """Disk the export needs at its peak: the output, plus the temporary merged folder a GGUF is converted from."""
    n = base_parameters(adapter)
    need = n * _BYTES_PER_PARAM[quant]
    if fmt == "gguf":
        need += n * _BYTES_PER_PARAM["bf16"]
    return int(need * _MARGIN) + _MARGIN_BYTES


def check_free_space(adapter: str, fmt: str, quant: str, reserve_bytes: int = 0) -> dict:
    """Refuse up front, with the numbers, when the exports store's filesystem has too little room.
    reserve_bytes: free space to leave on the disk after the export (the operator's headroom)."""
    need = required_bytes(adapter, fmt, quant)
    free = shutil.disk_usage(exports_dir()).free
    if need + reserve_bytes > free:
        raise ExportError(f"not enough free disk for this export: it needs about {need / 2**20:.0f} MiB"
                          + (f" plus {reserve_bytes / 2**20:.0f} MiB reserved" if reserve_bytes else "")
                          + f", and {exports_dir()} has {free / 2**20:.0f} MiB free")
    return {"required_bytes": need, "free_bytes": free, "reserve_bytes": reserve_bytes}


def _write_hf(adapter: str, quant: str, staged: Path, progress: Progress) -> dict:
    from finetune.export.merge import save_merged

    return {"merge": save_merged(adapter, staged, quant, progress)}


def _write_gguf(adapter: str, quant: str, staged: Path, progress: Progress) -> dict:
    from transformers import AutoTokenizer

    from finetune.export.card import merged_card
    from finetune.export.gguf_model import write_gguf
    from finetune.export.merge import adapter_source, save_merged
    from finetune.export.modelfile import modelfile

    merged = staged / "merged-tmp"
    merged.mkdir()
    report = save_merged(adapter, merged, "bf16", progress)
    gguf_name = f"{adapter}-{quant}.gguf"
    info = write_gguf(merged, staged / gguf_name, quant, adapter, progress)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    (staged / "Modelfile").write_text(modelfile(gguf_name, tokenizer), encoding="utf-8")
    _, meta, _ = adapter_source(adapter)
    extra = (f"\n## GGUF\n\n`{gguf_name}`: {info['architecture']}, {quant}, {info['tensors']} tensors, converted from "
             "the merged bf16 weights. Run it with llama.cpp or Ollama (see the Modelfile beside it).\n")
    (staged / "README.md").write_text(merged_card(adapter, meta, report, extra), encoding="utf-8")
    shutil.rmtree(merged)
    return {"merge": report, "gguf": info}


def run_export(adapter: str, fmt: str = "hf", quant: str | None = None, progress: Progress = _log_progress,
               reserve_bytes: int = 0) -> dict:
    """Export `adapter` and publish it under exports_dir()/<adapter>/<fmt>-<quant>/. Returns the manifest with
    "path" (the published folder)."""
    quant = check_request(adapter, fmt, quant)
    from finetune.store import adapters

    adapters.get_adapter(adapter)  # a clear FileNotFoundError before any work
    target = export_path(adapter, fmt, quant)
    space = check_free_space(adapter, fmt, quant, reserve_bytes)
    t0 = time.perf_counter()
    staged = staging_dir()
    try:
        written = (_write_hf if fmt == "hf" else _write_gguf)(adapter, quant, staged, progress)
        manifest = write_manifest(staged, {"adapter": adapter, "format": fmt, "quant": quant, **written,
                                           "disk": space, "export_seconds": round(time.perf_counter() - t0, 1)})
        publish(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    progress("published", 1, 1)
    return {**manifest, "path": str(target)}
