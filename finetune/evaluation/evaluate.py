"""Evaluate an adapter against its own base on held-out data: the same prompts, the same greedy decoding, scored
per example, then paired (adapter - base) with win/tie/loss counts and bootstrap confidence intervals.

    python -m finetune eval --adapter NAME [--data FILE] [--split validation] [--max-examples N] [--max-new-tokens N]

Results are cached beside the adapter in adapters/<name>/eval/<key>.json, where the key covers everything that can
change the numbers (the examples themselves, the settings, the adapter weights, the base and this code's version),
so asking twice never recomputes. The latest summary is also kept in the adapter's studio.json under "eval".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from finetune.evaluation import metrics as M
from finetune.errors import StudioError
from finetune.fsutil import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

# Bump when scoring changes, so cached results computed by older code are not served as current.
EVAL_VERSION = 1
GEN_BATCH_SIZE = 8          # generation rows per batch (left padded); 8 keeps CPU latency per batch reasonable
LOSS_BATCH_SIZE = 8
BOOTSTRAP = {"n_resamples": 2000, "seed": 0, "confidence": 0.95}

Progress = Callable[[float, str], None]


class EvalError(StudioError):
    """Evaluation cannot run: the message says which adapter, file or field is the problem."""


# --- examples ------------------------------------------------------------------------------------------------
def _example(messages: list[dict], record: dict, where: str) -> dict | None:
    """prompt = every message before the last assistant turn, reference = that turn's content."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0 or not any(m.get("role") == "user" for m in messages[:last]):
        return None  # nothing to prompt with (e.g. plain-text rows): not a question/answer example
    ex = {"prompt": [{"role": m["role"], "content": m["content"]} for m in messages[:last]],
          "reference": str(messages[last]["content"])}
    if isinstance(record.get("choices"), list) and record.get("answer") is not None:
        choices = [str(c) for c in record["choices"]]
        ex["choices"], ex["answer"] = choices, _answer_index(record["answer"], choices, where)
    return ex


def _answer_index(answer, choices: list[str], where: str) -> int:
    """'answer' may be an index, the text of a choice, or a letter A, B, C..."""
    if isinstance(answer, bool):
        answer = str(answer)
    if isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    text = str(answer).strip()
    if text in choices:
        return choices.index(text)
    if len(text) == 1 and text.isalpha() and 0 <= ord(text.upper()) - ord("A") < len(choices):
        return ord(text.upper()) - ord("A")
    if text.isdigit() and 0 <= int(text) < len(choices):
        return int(text)
    raise EvalError(f"{where}, field 'answer': {answer!r} is not an index, a letter or the text of one of the {len(choices)} choices")


def _mc_messages(record: dict, system_prompt: str | None) -> list[dict] | None:
    """Multiple-choice rows that are not chat/alpaca rows: {"question"|"prompt"|"instruction", "choices", "answer"}."""
    question = next((record[k] for k in ("question", "prompt", "instruction", "input") if isinstance(record.get(k), str)), None)
    if question is None or not isinstance(record.get("choices"), list) or record.get("answer") is None:
        return None
    choices = [str(c) for c in record["choices"]]
    try:
        ref = choices[_answer_index(record["answer"], choices, "row")]
    except EvalError:
        return None
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": question}, {"role": "assistant", "content": ref}]


def load_examples(data_path: str | None, split: str, data_cfg) -> tuple[list[dict], dict]:
    """The held-out examples and a description of where they came from."""
    from finetune import data as D

    if data_path:
        records = D.load_records(data_path, split, "data_path")
        # a file is held out as a whole; a folder or hub dataset has named splits
        source, used_split = data_path, split if Path(data_path).is_dir() or not Path(data_path).exists() else "held-out file"
    else:
        records = D.load_records(data_cfg.path, data_cfg.split)
        train, validation = D.split_records(records, data_cfg)
        if split in ("validation", "val", "test", "heldout"):
            records = validation
        elif split == "train":
            records = train
        else:
            raise EvalError(f"split {split!r}: without --data, use 'validation' (held out when training) or 'train'")
        source = data_cfg.validation_path if (records is validation and data_cfg.validation_path) else data_cfg.path
        used_split = split
    if not records:
        raise EvalError(f"{source}: no rows in split {used_split!r} to evaluate on")
    fmt = None
    try:
        fmt = data_cfg.format if (data_cfg.format != "auto" and not data_path) else D.detect_format(records, str(source))
    except D.DataError:
        if _mc_messages(records[0], data_cfg.system_prompt) is None:
            raise
    examples, skipped = [], 0
    for i, rec in enumerate(records):
        where = f"{source}, row {i + 1}"
        try:
            msgs = D.to_messages(rec, fmt, system_prompt=data_cfg.system_prompt) if fmt else _mc_messages(rec, data_cfg.system_prompt)
        except D.DataError as e:  # name the file and line, as training would
            src, line, unit = records.where(i) if isinstance(records, D.Records) else (str(source), i + 1, "row")
            raise e.at(src, line, unit) from None
        ex = _example(msgs, rec, where) if msgs else None
        if ex is None:
            skipped += 1
        else:
            examples.append(ex)
    if not examples:
        raise EvalError(f"{source}: none of the {len(records)} rows has a user prompt followed by an assistant answer")
    return examples, {"path": str(source), "split": used_split, "format": fmt or "multiple_choice",
                      "rows": len(records), "skipped": skipped}


# --- scoring with the model ------------------------------------------------------------------------------------
def _sequence_nll(adapter_name: str, use_adapter: bool, pairs: list[tuple[list[int], list[int]]], batch_size: int) -> list[tuple[float, int]]:
    """Teacher-forced negative log-likelihood of each target given its prompt: (sum over target tokens, count).

    Rows are left padded so every target sits at the end of its row; the model then only has to produce logits for
    the last max(target)+1 positions (logits_to_keep), which keeps a 49k-vocabulary model's memory small on a CPU."""
    import torch
    from finetune.evaluation import generate as G

    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    pad = 0  # any id: padded positions are masked out and never scored
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        k = max(len(pairs[i][1]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s)
            mask[r, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with G.lock():
            # Per batch, so a Playground request can interleave; activation is a no-op when nothing changed.
            loaded = G.locked_activate(adapter_name)
            with G.AdapterContext(loaded, adapter_name if use_adapter else None) as model, torch.inference_mode():
                dev = model.device
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                               logits_to_keep=k + 1).logits[:, -(k + 1):-1].float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        targets = ids[:, width - k:]
        tok_nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for r, i in enumerate(idx):
            n = len(pairs[i][1])
            out[i] = (float(tok_nll[r, k - n:].sum()), n)
    return out


def _encode_pairs(tok, examples: list[dict], max_len: int) -> tuple[list[tuple[list[int], list[int]]], list, int]:
    """(prompt ids, reference ids + end-of-turn) for the loss, and (example, choice, pair index) for each MC choice."""
    from finetune.evaluation import generate as G

    end = G.stop_token_ids(tok)
    end_id = end[-1] if end else None  # <|im_end|> for chat templates that have it: the token training learns
    pairs, mc, truncated = [], [], 0

    def fit(prompt_ids: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        nonlocal truncated
        if len(prompt_ids) + len(target) <= max_len:
            return prompt_ids, target
        truncated += 1
        target = target[: max_len - 1]
        return prompt_ids[len(prompt_ids) - (max_len - len(target)):], target  # keep the end of the prompt

    for e_i, ex in enumerate(examples):
        p = tok(G.prompt_text(tok, ex["prompt"]), add_special_tokens=False)["input_ids"]
        ref = tok(ex["reference"], add_special_tokens=False)["input_ids"] + ([end_id] if end_id is not None else [])
        pairs.append(fit(p, ref))
        for c_i, choice in enumerate(ex.get("choices") or []):
            mc.append((e_i, c_i, len(pairs)))
            pairs.append(fit(p, tok(choice, add_special_tokens=False)["input_ids"] or [end_id]))
    return pairs, mc, truncated


def _score_side(adapter_name: str, use_adapter: bool, examples: list[dict], pairs, mc, max_new_tokens: int, max_prompt: int,
                progress: Progress | None, p0: float, p1: float) -> dict:
    from finetune.evaluation import generate as G

    adapter = adapter_name if use_adapter else None
    n = len(examples)
    # Longest prompts together: less padding per batch. Results are put back in the examples' order.
    order = sorted(range(n), key=lambda i: len(pairs[i][0]))
    outputs: list[str] = [""] * n
    rows: list[dict] = [{}] * n
    gen_s, peak = 0.0, None
    with G.PeakMemory() as mem:
        for b, start in enumerate(range(0, n, GEN_BATCH_SIZE)):
            idx = order[start:start + GEN_BATCH_SIZE]
            with G.lock():
                loaded = G.locked_activate(adapter_name)
                texts, st = G.locked_generate_batch(loaded, adapter, [examples[i]["prompt"] for i in idx],
                                                     max_new_tokens, max_prompt_tokens=max_prompt)
            gen_s += st["latency_s"]
            peak = max(peak or 0.0, st["peak_memory_mb"] or 0.0)
            for i, t, r in zip(idx, texts, st["rows"]):
                outputs[i], rows[i] = t, r
            if progress:
                progress(p0 + (p1 - p0) * 0.8 * min(1.0, (start + len(idx)) / n),
                         f"{'adapter' if adapter else 'base'}: generated {start + len(idx)}/{n}")
        nll = _sequence_nll(adapter_name, use_adapter, pairs, LOSS_BATCH_SIZE)
    peak = max(peak or 0.0, mem.peak_mb or 0.0)
    per_example = []
    for i, ex in enumerate(examples):
        s = M.text_scores(outputs[i], ex["reference"])
        total, count = nll[i]
        s["loss"] = total / count if count else None
        per_example.append(s)
    for e_i, c_i, p_i in mc:
        examples[e_i].setdefault("_ll", {}).setdefault(bool(adapter), []).append(-nll[p_i][0])
    for e_i, ex in enumerate(examples):
        lls = ex.get("_ll", {}).get(bool(adapter))
        if lls:
            per_example[e_i]["mc_correct"] = float(max(range(len(lls)), key=lls.__getitem__) == ex["answer"])
    new_tokens = sum(r["new_tokens"] for r in rows)
    total_nll = sum(nll[i][0] for i in range(n))
    total_tok = sum(nll[i][1] for i in range(n))
    mean_loss = total_nll / total_tok if total_tok else None
    summary = {
        "val_loss": mean_loss,                     # token-weighted, like a trainer's eval loss
        "perplexity": M.perplexity(mean_loss),
        **{m.name: M.mean([s[m.name] for s in per_example]) for m in M.TEXT_METRICS},
        "tokens_per_second": new_tokens / gen_s if gen_s > 0 else None,
        "latency_s": gen_s / n,                    # generation time per example (batched, so amortised)
        "generation_s": gen_s,
        "mean_new_tokens": new_tokens / n,
        "stopped_rate": M.mean([float(r["stopped"]) for r in rows]),   # answers that ended their turn themselves
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda_max_allocated" if _cuda() else "process_rss",
    }
    if mc:
        summary["mc_accuracy"] = M.mean([s["mc_correct"] for s in per_example if "mc_correct" in s])
    return {"outputs": outputs, "scores": per_example, "summary": summary}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- the evaluation ------------------------------------------------------------------------------------------
def _adapter_config(adapter_name: str):
    from finetune import policy
    from finetune.store import adapters
    from finetune.config import ConfigError, JobConfig

    try:
        meta = adapters.get_adapter(adapter_name)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    except ValueError as e:  # a bad name, an unreadable studio.json
        raise EvalError(f"adapter {adapter_name!r}: {e}") from None
    raw = meta.get("config")
    try:
        cfg = JobConfig.parse(raw, f"{adapter_name}/studio.json config") if isinstance(raw, dict) else JobConfig(adapter_name=adapter_name)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    if not isinstance(raw, dict):
        cfg.model = adapters.resolve_base(adapter_name)  # adapters from elsewhere: only their base is known
    policy.check_model_config(cfg.model, f"adapter {adapter_name!r}")
    return meta, cfg


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def evaluate(adapter_name: str, data_path: str | None = None, split: str = "validation", max_examples: int | None = None,
             max_new_tokens: int | None = None, *, use_cache: bool = True, progress: Progress | None = None) -> dict:
    """Base vs base + adapter on held-out examples. See the module docstring for the JSON's shape."""
    from finetune.store import adapters
    from finetune.evaluation import generate as G

    t_start = time.time()
    meta, cfg = _adapter_config(adapter_name)
    adir = adapters.adapter_path(adapter_name)
    examples, data_info = load_examples(data_path, split, cfg.data)
    limit = max_examples if max_examples is not None else cfg.evaluation.max_examples
    if limit is not None and limit <= 0:
        raise EvalError(f"max_examples must be positive, got {limit}")
    available = len(examples)
    examples = examples[:limit] if limit else examples
    max_new_tokens = int(max_new_tokens or cfg.evaluation.max_new_tokens)
    fingerprint = hashlib.sha256(json.dumps([{k: e[k] for k in ("prompt", "reference", "choices", "answer") if k in e}
                                             for e in examples], sort_keys=True).encode()).hexdigest()
    weights = adir / "adapter_model.safetensors"
    if not weights.exists():
        raise EvalError(f"{weights}: adapter weights missing; the adapter folder is incomplete")
    # The fingerprint is of the examples actually used, so it stands for the data, the split and max_examples at
    # once: asking for 16 or 20 examples of a 12-row file is the same evaluation and is served from the cache.
    key_parts = {"version": EVAL_VERSION, "data": fingerprint,
                 "max_new_tokens": max_new_tokens, "weights": sha256_file(weights),
                 "adapter_config": sha256_file(adir / "adapter_config.json") if (adir / "adapter_config.json").exists() else None,
                 "base": cfg.model.model_dump(mode="json"), "max_seq_length": cfg.data.max_seq_length}
    key = cache_key(key_parts)
    cache_file = adir / "eval" / f"{key}.json"
    if use_cache and cache_file.exists():
        try:
            result = json.loads(cache_file.read_text(encoding="utf-8"))
            log.info("cached evaluation %s (computed in %.1fs)", cache_file, result.get("duration_s", 0))
            return result
        except (OSError, json.JSONDecodeError):
            log.warning("unreadable cached evaluation %s: recomputing", cache_file)
    log.info("evaluating %s on %d of %d examples from %s (%s), max_new_tokens=%d", adapter_name, len(examples),
             available, data_info["path"], data_info["split"], max_new_tokens)
    if progress:  # says up front how much of the data is used
        progress(0.0, f"loading the model to evaluate {len(examples)} of {available} examples of {data_info['path']}")

    with G.lock():
        loaded = G.locked_activate(adapter_name)  # the adapter's base, with its quantization; loaded once
    tok = loaded.tokenizer
    max_len = cfg.data.max_seq_length
    pairs, mc, truncated = _encode_pairs(tok, examples, max_len)
    sides = {}
    for s_i, side in enumerate(("base", "adapter")):
        sides[side] = _score_side(adapter_name, side == "adapter", examples, pairs, mc,
                                  max_new_tokens, max_len, progress, 0.05 + 0.45 * s_i, 0.5 + 0.45 * s_i)
    for ex in examples:
        ex.pop("_ll", None)

    paired = _paired(sides, mc)
    out_examples = _example_rows(examples, sides)

    result = {
        "adapter": adapter_name,
        "base_model": cfg.model.name_or_path,
        "base_path": loaded.key[0],
        "quantization": cfg.model.quantization,
        "data": {**data_info, "n": len(examples), "available": available, "fingerprint": fingerprint},
        "settings": {"max_examples": limit, "max_new_tokens": max_new_tokens, "decoding": "greedy",
                     "batch_size": GEN_BATCH_SIZE, "max_seq_length": max_len, "truncated": truncated,
                     "system_prompt": cfg.data.system_prompt, "bootstrap": BOOTSTRAP, "tie_epsilon": M.TIE_EPSILON,
                     "device": str(loaded.model.device), "eval_version": EVAL_VERSION},
        "metrics": {"base": sides["base"]["summary"], "adapter": sides["adapter"]["summary"]},
        "paired": paired,
        "examples": out_examples,
        "key": key,
        "created_at": time.time(),
        "duration_s": round(time.time() - t_start, 2),
    }
    _store(adapter_name, cache_file, result)
    if progress:
        progress(1.0, "done")
    return result


def _paired(sides: dict, mc: bool) -> dict:
    """Per metric of the registry with a per-example score: the paired adapter-versus-base statistics."""
    paired = {}
    for metric in M.METRICS:
        score = metric.example_key
        if score is None or (score == "mc_correct" and not mc):
            continue
        b = [s[score] for s in sides["base"]["scores"]]
        a = [s[score] for s in sides["adapter"]["scores"]]
        if any(v is None for v in a + b):
            continue
        paired[metric.name] = M.paired_stats(b, a, higher_is_better=metric.higher_is_better, **BOOTSTRAP)
    return paired


def _example_rows(examples: list[dict], sides: dict) -> list[dict]:
    """One row per example: prompt, reference, both answers and their scores with the difference."""
    rows = []
    for i, ex in enumerate(examples):
        bs, as_ = sides["base"]["scores"][i], sides["adapter"]["scores"][i]
        item = {"prompt": _prompt_str(ex["prompt"]), "messages": ex["prompt"], "reference": ex["reference"],
                "base": sides["base"]["outputs"][i], "adapter": sides["adapter"]["outputs"][i],
                "scores": {"base": bs, "adapter": as_,
                           "diff": {k: (as_[k] - bs[k]) if as_.get(k) is not None and bs.get(k) is not None else None for k in bs}}}
        if "choices" in ex:
            item["choices"], item["answer"] = ex["choices"], ex["answer"]
        rows.append(item)
    return rows


def _prompt_str(messages: list[dict]) -> str:
    """The prompt as a person reads it: the last user turn, with earlier turns above it when there are several."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


def _store(adapter_name: str, cache_file: Path, result: dict) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache_file, result, ensure_ascii=False)
    summary = {k: result[k] for k in ("key", "data", "settings", "metrics", "paired", "created_at", "duration_s")}
    summary["file"] = str(cache_file.relative_to(cache_file.parent.parent))
    try:
        from finetune.store import adapters

        adapters.update_metadata(adapter_name, "eval", summary)
    except Exception as e:  # the eval file is the record; the studio.json summary is a convenience
        log.warning("could not record the evaluation summary in studio.json: %s", e)


def cached_results(adapter_name: str) -> list[dict]:
    """Every stored evaluation of an adapter, newest first (for the Adapters tab)."""
    from finetune.store import adapters

    folder = adapters.adapter_path(adapter_name) / "eval"
    results = []
    for f in folder.glob("*.json") if folder.is_dir() else []:
        try:
            results.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(results, key=lambda r: r.get("created_at", 0), reverse=True)


# --- CLI -----------------------------------------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m finetune eval",
                                 description="Evaluate an adapter against its base on held-out data; prints JSON.")
    ap.add_argument("--adapter", required=True, help="adapter name in the store")
    ap.add_argument("--data", default=None, help="held-out file or dataset (default: the adapter's own validation split)")
    ap.add_argument("--split", default="validation", help="split of --data (hub id / datasets folder), or of the adapter's data")
    ap.add_argument("--max-examples", type=int, default=None, help="at most N examples (default: the job's evaluation.max_examples)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: the job's evaluation.max_new_tokens)")
    ap.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    ap.add_argument("--summary", action="store_true", help="print the metrics and paired statistics without the examples")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = evaluate(args.adapter, args.data, args.split, args.max_examples, args.max_new_tokens,
                          use_cache=not args.no_cache)
    except (EvalError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.summary:
        result = {k: v for k, v in result.items() if k != "examples"}
    json.dump(result, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
