"""Model cards for exports: what was merged, from which adapter and base, and what the merge changed numerically."""
from __future__ import annotations


def _provenance_rows(meta: dict) -> str:
    base = meta.get("base_model_info") or {}
    cfg = meta.get("config") or {}
    lora = cfg.get("lora") or {}
    data = meta.get("dataset") or {}
    metrics = meta.get("metrics") or {}
    rows = [
        ("adapter", meta.get("name")),
        ("base model", f"{base.get('name') or meta.get('base_model')} "
                       f"({base.get('sha256') or base.get('revision') or base.get('path') or '-'})"),
        ("quantization while training", meta.get("quantization") or "none"),
        ("LoRA", ", ".join(f"{k}={lora[k]}" for k in ("r", "lora_alpha", "target_modules") if k in lora) or "-"),
        ("data", f"{(cfg.get('data') or {}).get('path', '-')} (fingerprint {str(data.get('fingerprint'))[:16]})"),
        ("training", f"{metrics.get('steps', '-')} steps, final loss {metrics.get('final_loss', '-')}"),
        ("adapter created", meta.get("created_at", "-")),
    ]
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def _merge_rows(report: dict) -> str:
    rows = [("saved dtype", report["dtype"]),
            ("max abs logit difference vs peft base + adapter, merged in float32",
             report["max_abs_logit_diff_merge_float32"]),
            (f"max abs logit difference vs peft base + adapter, weights saved in {report['dtype']}",
             report["max_abs_logit_diff_vs_peft"])]
    if "max_abs_logit_diff_vs_trained_quantized" in report:
        rows.append((f"max abs logit difference vs the {report['trained_quantization']} base + adapter (as trained)",
                     report["max_abs_logit_diff_vs_trained_quantized"]))
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def _quant_note(report: dict) -> str:
    if report.get("trained_quantization", "none") == "none":
        return "The adapter was trained on the unquantized base and merged into it."
    return (f"The adapter was trained on a {report['trained_quantization']} (bitsandbytes) base. It was merged into the "
            "base loaded unquantized (float32, dequantized), never into quantized weights, then saved in "
            f"{report['dtype']}. The quantized base it was trained on differs slightly from the unquantized one; "
            "the table shows how much the logits move.")


def merged_card(name: str, meta: dict, report: dict, extra: str = "") -> str:
    base = meta.get("base_model_info") or {}
    hub = base.get("hub_id") or base.get("name") or meta.get("base_model") or "-"
    prompts = "; ".join(report.get("prompts", []))
    return f"""---
base_model: {hub}
tags: [peft-studio, merged-lora]
---
# {name} (merged)

The LoRA adapter **{name}** merged into its base model with PEFT Studio. It loads without peft.

## Provenance

| | |
| --- | --- |
{_provenance_rows(meta)}

## What the merge changed

{_quant_note(report)}

| | |
| --- | --- |
{_merge_rows(report)}

Measured on these chat prompts (all positions' logits): {prompts}
{extra}"""
