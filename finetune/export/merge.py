"""Merge a LoRA adapter into its base: one Hugging Face folder that runs without peft.

The base is always loaded unquantized in float32 for the merge, also for a QLoRA adapter: merging into 4-bit weights
would round the adapter's small update away, so the merged weights are the dequantized base plus the LoRA update,
rounded once to the saved dtype. The report measures what that costs: the largest absolute logit difference between
the merged model and peft's base + adapter on a few chat prompts (and, for a quantized adapter, against the
quantized base + adapter it was trained with).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

# Short chat prompts for the logit comparison: enough tokens to cover the template, the turn markers and an answer.
CHECK_PROMPTS = (
    "What is 12 plus 30?",
    "Write one sentence about the sea.",
    "Name three colours.",
)
SAVE_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}

Progress = Callable[[str, int, int], None]


def _quiet(*_a) -> None:
    return None


def adapter_source(name: str) -> tuple[Path, dict, object]:
    """(adapter folder, studio.json, the ModelConfig it was trained with) for a stored adapter."""
    from finetune.store import adapters

    meta = adapters.get_adapter(name)  # validates the name and that the adapter exists
    path = adapters.adapter_path(name)
    return path, meta, adapters.resolve_base(str(path))


def _logits(model, tokenizer, prompts=CHECK_PROMPTS):
    import torch

    from finetune.evaluation.generate import prompt_text

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(prompt_text(tokenizer, p), return_tensors="pt").input_ids.to(model.device)
            out.append(model(ids).logits.float().cpu())
    return out


def max_abs_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _quantized_reference(model_cfg, adapter_dir: Path, tokenizer):
    """Logits of the quantized base + adapter, as the adapter was trained."""
    from finetune.model import load_adapter, load_model

    base = load_model(model_cfg, for_training=False)
    model = load_adapter(base, adapter_dir).eval()
    try:
        return _logits(model, tokenizer)
    finally:
        del model, base


def merged_model(name: str, dtype: str = "bf16", progress: Progress = _quiet):
    """(merged model in `dtype`, tokenizer, report). The report has the logit differences the merge introduces."""
    import torch
    from finetune.model import load_adapter, load_model, load_tokenizer

    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    adapter_dir, meta, model_cfg = adapter_source(name)
    trained_quant = model_cfg.quantization
    progress("loading the base model unquantized", 1, 5)
    tokenizer = load_tokenizer(model_cfg)
    full = model_cfg.model_copy(update={"quantization": "none", "torch_dtype": "float32"})
    base = load_model(full, for_training=False)
    model = load_adapter(base, adapter_dir).eval()
    progress("measuring base + adapter", 2, 5)
    reference = _logits(model, tokenizer)
    merged = model.merge_and_unload().eval()
    merged.config.use_cache = True
    merged.config.__dict__.pop("quantization_config", None)
    progress("measuring the merged model", 3, 5)
    exact = _logits(merged, tokenizer)
    # The weights as they will be saved (rounded once to `dtype`), computed in float32 so that the number is what
    # the saved weights change, not what a lower-precision matmul adds on top.
    merged.to(getattr(torch, SAVE_DTYPES[dtype])).to(torch.float32)
    saved = _logits(merged, tokenizer)
    merged.to(getattr(torch, SAVE_DTYPES[dtype]))
    report = {"dtype": dtype, "trained_quantization": trained_quant, "prompts": list(CHECK_PROMPTS),
              "reference": "peft: base (unquantized, float32) + adapter",
              "max_abs_logit_diff_merge_float32": round(max_abs_diff(reference, exact), 6),
              "max_abs_logit_diff_vs_peft": round(max_abs_diff(reference, saved), 6)}
    if trained_quant != "none":
        progress(f"measuring the {trained_quant} base + adapter it was trained with", 4, 5)
        quant_ref = _quantized_reference(model_cfg, adapter_dir, tokenizer)
        report["max_abs_logit_diff_vs_trained_quantized"] = round(max_abs_diff(quant_ref, saved), 6)
    return merged, tokenizer, meta, report


def generation_settings(tokenizer) -> dict:
    """generation_config.json fields: stop at the end of a turn as well as at EOS."""
    from finetune.evaluation.generate import stop_token_ids

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stops, "pad_token_id": pad, "do_sample": False}


def save_merged(name: str, out_dir: Path, dtype: str = "bf16", progress: Progress = _quiet,
                max_shard_size: str = "2GB") -> dict:
    """Write the merged model into out_dir (an empty folder). Returns the merge report."""
    from transformers import GenerationConfig

    from finetune.export.card import merged_card

    merged, tokenizer, meta, report = merged_model(name, dtype, progress)
    progress("writing safetensors shards", 5, 5)
    merged.generation_config = GenerationConfig(**generation_settings(tokenizer))
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    report["architecture"] = (merged.config.architectures or [type(merged).__name__])[0]
    report["parameters"] = sum(p.numel() for p in merged.parameters())
    (out_dir / "README.md").write_text(merged_card(name, meta, report), encoding="utf-8")
    (out_dir / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
