"""Teacher, student and base side by side on held-out prompts: the trade a distilled adapter makes.

Quality is measured against the teacher: its greedy answers are the references (ROUGE-L of each model's own greedy
answer) and the mean per-token KL(teacher || model) on the teacher's answer tokens (0 for the teacher itself).
Speed and memory come from the same generation calls: tokens/s, latency and peak memory per model.

CLI: python -m finetune eval-distill ADAPTER [--data FILE] [--max-examples N] [--max-new-tokens N]
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)
SIDES = ("teacher", "student", "base")


def _answer_logprobs(model, tokenizer, prompt: list[dict], answer: str):
    """Log-probabilities [answer tokens x vocab] the model gives the teacher's answer after the prompt."""
    import torch

    from finetune.evaluation.generate import prompt_text

    prefix = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    ids = prefix + tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, len(prefix) - 1:-1]
    return torch.log_softmax(logits.float()[:, :len(tokenizer)], dim=-1).cpu()


def _kl(teacher_logp, logp) -> tuple[float, int]:
    """Summed KL(teacher || model) over the answer tokens, and their count."""
    if teacher_logp.shape[0] == 0:
        return 0.0, 0
    return float((teacher_logp.exp() * (teacher_logp - logp)).sum()), teacher_logp.shape[0]


def _side(name: str, how: tuple, prompts: list, references: list[str] | None, teacher_logps: list | None,
          max_new_tokens: int) -> tuple[dict, list[str], list]:
    """One model's answers, speed, memory and (given the teacher's) ROUGE-L and KL; the caller holds the lock."""
    from finetune.evaluation import generate as G
    from finetune.evaluation.metrics import mean, rouge_l

    adapter, base, quantization = how
    loaded, ctx = G.model_for(adapter, base, quantization)
    texts, stats = G.locked_generate_batch(loaded, adapter, prompts, max_new_tokens)
    refs = references if references is not None else texts
    logps, kl_sum, kl_tokens = [], 0.0, 0
    with ctx as model:
        for prompt, ref, t_logp in zip(prompts, refs, teacher_logps or [None] * len(prompts)):
            logp = _answer_logprobs(model, loaded.tokenizer, prompt, ref)
            logps.append(logp)
            if t_logp is not None:
                s, n = _kl(t_logp, logp)
                kl_sum, kl_tokens = kl_sum + s, kl_tokens + n
    row = {"model": adapter or base, "quantization": loaded.key[1],
           "rouge_l_vs_teacher": round(mean([rouge_l(t, r) for t, r in zip(texts, refs)]) or 0.0, 4),
           "kl_to_teacher": round(kl_sum / kl_tokens, 5) if kl_tokens else 0.0,
           "tokens_per_second": round(stats["tokens_per_second"] or 0.0, 2),
           "latency_s": round(stats["latency_s"], 3), "new_tokens": stats["new_tokens"],
           "peak_memory_mb": round(stats["peak_memory_mb"], 1) if stats["peak_memory_mb"] else None}
    log.info("%s: %s", name, row)
    return row, texts, logps


def compare(adapter_name: str, data_path: str | None = None, split: str = "validation", max_examples: int = 16,
            max_new_tokens: int = 64) -> dict:
    """Teacher, student (the adapter) and the student's base on held-out prompts."""
    from finetune.evaluation import generate as G
    from finetune.evaluation.evaluate import EvalError, _adapter_config, load_examples
    from finetune.recipe.references import resolve_teacher

    t0 = time.time()
    _, cfg = _adapter_config(adapter_name)
    if cfg.training.objective != "distill":
        raise EvalError(f"adapter {adapter_name!r} was not distilled (training.objective is {cfg.training.objective})")
    teacher = resolve_teacher(cfg)
    examples, info = load_examples(data_path, split, cfg.data)
    prompts = [ex["prompt"] for ex in examples[:max_examples]]
    how = {"teacher": (teacher.adapter.name if teacher.adapter else None, teacher.model.name_or_path,
                       teacher.model.quantization),
           "student": (adapter_name, None, None),
           "base": (None, cfg.model.name_or_path, cfg.model.quantization)}
    rows, answers = {}, {}
    with G.lock():
        rows["teacher"], answers["teacher"], t_logps = _side("teacher", how["teacher"], prompts, None, None,
                                                             max_new_tokens)
        for side in ("student", "base"):
            rows[side], answers[side], _ = _side(side, how[side], prompts, answers["teacher"], t_logps,
                                                 max_new_tokens)
    examples_out = [{"prompt": p[-1]["content"], **{s: answers[s][i] for s in SIDES}} for i, p in enumerate(prompts)]
    return {"adapter": adapter_name, "teacher": teacher.record(), "data": {**info, "examples": len(prompts)},
            "settings": {"max_new_tokens": max_new_tokens}, "models": rows, "examples": examples_out,
            "created_at": time.time(), "duration_s": round(time.time() - t0, 2)}


def record_comparison(config, meta: dict) -> None:
    """After a distillation run: the comparison into studio.json ("distill_eval") and `meta`; a failure is logged,
    never fatal (the adapter is saved)."""
    from finetune.store import adapters

    ev = config.evaluation
    try:
        result = compare(config.adapter_name, max_examples=ev.max_examples, max_new_tokens=ev.max_new_tokens)
    except Exception as e:
        log.warning("teacher/student/base comparison failed (the adapter is saved): %s: %s", type(e).__name__, e)
        return
    adapters.update_metadata(config.adapter_name, "distill_eval", result)
    meta["distill_eval"] = result


def cli(argv: list[str]) -> int:
    import argparse
    import json

    from finetune.errors import plain_message

    p = argparse.ArgumentParser(prog="python -m finetune eval-distill", description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="a distilled adapter in the store")
    p.add_argument("--data", help="held-out file (default: the adapter's own validation rows)")
    p.add_argument("--max-examples", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args(argv)
    try:
        result = compare(a.adapter, a.data, max_examples=a.max_examples, max_new_tokens=a.max_new_tokens)
    except Exception as e:
        print(f"error: {plain_message(e)}")
        return 1
    print(json.dumps(result, indent=1))
    return 0
