"""One benchmark arm in its own process (Unsloth patches transformers on import, so arms never share one):

    python -m finetune.bench.arms JOB.json RESULT.json

JOB: {"arm": "naive"|"naive:bf16"|"unsloth"|"unsloth:packed"|"studio"|"recipe"|"studio:<STUDIO_SPEED switches>", "model_dir",
      "shape", "mode": "qlora"|"lora", "seq": int|"var", "batch", "steps", "warmup", "seed", "kind": "throughput"|"longest",
      "mem_limit_gib", "ladder", "profile": steps to run under the torch profiler after the timed ones, "trace"}
RESULT: per-step times, tokens and losses, the median tokens/s after warm-up, peak memory, MFU, the library
versions and the speed-ups the arm applied; or {"error": ...} with the reason.

The three arms train the same LoRA (r=16, alpha=16, dropout 0, every linear layer of every decoder block) with
AdamW (lr 2e-4, grad-norm clip 1.0) on the same batches:
  naive    transformers + peft as a typical user writes it: SDPA, padded batches, non-reentrant gradient
           checkpointing, prepare_model_for_kbit_training for QLoRA, bf16 autocast (what Trainer(bf16=True) does);
           "naive:bf16": the same with the frozen embeddings and norms that prepare_model_for_kbit_training upcast
           cast back to bf16, so the hidden states between layers are bf16 (as Unsloth and the studio keep them)
           instead of fp32: it separates that precision choice from everything else in a loss comparison
  unsloth  FastLanguageModel with its defaults, use_gradient_checkpointing="unsloth", padded batches, bf16 autocast;
           "unsloth:packed": the same model fed one packed row with packed_seq_lengths and restarting position_ids,
           as Unsloth's trainer feeds it with a padding-free collator (its default on a GPU that supports it)
  recipe   the real job end to end (`python -m finetune train`, finetune/bench/recipe_arm.py) on the same model and
           batches, timed by the trainer's own per-step metrics
  studio   our training path: finetune.model.load_model / apply_lora, finetune.recipe.speed.patch_model_for_speed, the
           padding-free finetune.data.collate and SFTRecipe.train_step (finetune/recipe/sft.py) itself
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback

LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 2e-4
LADDER = [16384, 32768, 49152, 65536, 98304, 131072]  # the longest-sequence probe's lengths, tried in order


def versions() -> dict:
    """The versions of the libraries a benchmark result depends on (recorded beside every result)."""
    from finetune.recipe.provenance import library_versions

    found = library_versions(("liger-kernel", "unsloth", "unsloth_zoo", "triton"))
    return {k: v for k, v in found.items() if v is not None}


def _padded(examples, pad_id, device):
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# --- the arms: each returns (model, step(examples) -> loss float, info) ----------------------------------------------
def setup_naive(job, device):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    if job["mode"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], **kwargs)
    model.config.use_cache = False
    gc_kwargs = {"use_reentrant": False}
    if job["mode"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gc_kwargs)
        if job["arm"] == "naive:bf16":
            from finetune.recipe.speed import keep_compute_dtype

            keep_compute_dtype(model, torch.bfloat16)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    model = get_peft_model(model, LoraConfig(**LORA, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()  # from_pretrained leaves eval mode, where checkpointing is off (Trainer.train() switches it)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else None

    def step(examples):
        batch = _padded(examples, tok.pad_token_id, device)
        if autocast is not None:
            with autocast:
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step, {"speedups": []}


def setup_unsloth(job, device):
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel

    import torch

    if job.get("kind") == "longest":
        max_len = max(job.get("ladder") or LADDER)
    else:
        max_len = job.get("max_len") or (2048 if job["seq"] == "var" else int(job["seq"]))
    model, tok = FastLanguageModel.from_pretrained(model_name=job["model_dir"], max_seq_length=max_len,
                                                   dtype=torch.bfloat16, load_in_4bit=job["mode"] == "qlora",
                                                   )
    model = FastLanguageModel.get_peft_model(model, target_modules=TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=job.get("seed", 0),
                                             max_seq_length=max_len, **LORA)
    FastLanguageModel.for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    packed = job["arm"].split(":", 1)[1:] == ["packed"]
    if packed:  # what Unsloth's trainer does for a padding-free collator (unsloth/utils/packing.py)
        from unsloth.utils.packing import _enable_hf_packed_attention, mark_allow_overlength

        mark_allow_overlength(model)
        _enable_hf_packed_attention()

    def collate(examples):
        if not packed:
            return _padded(examples, pad, device)
        from finetune import data as D

        batch = {k: v.to(device) for k, v in D.collate(examples, pad, padding_free=True).items()}
        batch["packed_seq_lengths"] = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.int32,
                                                   device=device)
        return batch

    def step(examples):
        batch = collate(examples)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step, {"speedups": ["unsloth defaults"] + (["padding-free packed rows"] if packed else [])}


def setup_studio(job, device):
    """The studio's own recipe: SFTRecipe's model and optimizer setup and its train_step, fed the benchmark's batches."""
    from finetune.config import JobConfig
    from finetune.recipe.sft import SFTRecipe, freeze_heap, pin_offload_ahead

    arm = job["arm"]
    if ":" in arm:  # studio:<switches> - an experiment with pieces of the fast path toggled
        os.environ["STUDIO_SPEED"] = arm.split(":", 1)[1].replace("+", ",+").replace("-", ",-").strip(",")
    config = JobConfig.parse({
        "model": {"name_or_path": job["model_dir"], "quantization": "4bit" if job["mode"] == "qlora" else "none",
                  "torch_dtype": "bfloat16"},
        "lora": {**LORA, "target_modules": TARGETS},
        "training": {"learning_rate": LR, "gradient_checkpointing": True, "lr_scheduler_type": "constant", "seed": job.get("seed", 0),
                     "gradient_checkpointing_layers": job.get("checkpointed_layers"),
                     "warmup_ratio": 0.0, "max_steps": max(1, job.get("warmup", 0) + job.get("steps", 1))},
        "evaluation": {"enabled": False}}, "benchmark job")
    recipe = SFTRecipe(config)  # no run folder: nothing is written
    recipe.setup(data=False)
    if job.get("kind") != "longest" and device.type == "cuda":  # as setup() does with the run's own data
        pin_offload_ahead(recipe, job_batches(job, recipe.model.config.vocab_size))
    recipe.model.train()
    freeze_heap()  # as SFTRecipe.train does around its loop (this process ends with the arm)

    def step(examples):
        return recipe.train_step([recipe.collate(examples)]).loss

    return recipe.model, step, {"speedups": recipe.speedups}


SETUPS = {"naive": setup_naive, "unsloth": setup_unsloth, "studio": setup_studio}


def job_batches(job: dict, vocab: int) -> list:
    """The batches of a job's warm-up and measured steps: the same for every arm, and what the studio arm's setup
    pins the offload for."""
    from finetune.bench.models import make_batches

    return make_batches(job["seq"], job["batch"], job["warmup"] + job["steps"], vocab, seed=job.get("data_seed", 0))


# --- measuring ---------------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mem(device) -> dict:
    import torch

    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def run_job(job: dict) -> dict:
    import torch

    from finetune.bench.models import device_peak_flops, step_flops

    torch.manual_seed(job.get("seed", 0))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    result: dict = {"job": job, "versions": versions(), "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda" else "cpu"}
    if device.type == "cuda" and job.get("mem_limit_gib"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job["mem_limit_gib"] * 2**30 / total), device)
    t0 = time.perf_counter()
    base = job["arm"].split(":", 1)[0]
    if base == "recipe":
        from finetune.bench.recipe_arm import run_recipe

        return run_recipe(job, device, result)
    model, step, info = SETUPS[base](job, device)
    result.update(info, setup_s=round(time.perf_counter() - t0, 1))
    vocab = model.config.vocab_size if hasattr(model, "config") else 512
    result["setup_memory"] = _mem(device)
    if device.type == "cuda":
        # what training adds on top of the loaded model is the peak minus this
        result["resident_gib"] = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    peak = device_peak_flops(result["device"])

    if job.get("kind") == "longest":
        return _longest(job, step, device, vocab, result)

    rows = []
    for i, examples in enumerate(job_batches(job, vocab)):
        _sync(device)
        full_collections = gc.get_stats()[2]["collections"]
        t = time.perf_counter()
        loss = step(examples)
        _sync(device)
        dt = time.perf_counter() - t
        lengths = [len(e["input_ids"]) for e in examples]
        tokens = sum(lengths)
        rows.append({"step": i + 1, "seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt, "loss": loss,
                     "tflops": step_flops(job["shape"], lengths) / dt / 1e12,
                     "full_gc": gc.get_stats()[2]["collections"] - full_collections})
    if job.get("profile"):
        from finetune.bench.profile import profile_steps

        result["profile"] = profile_steps(step, batches[-job["profile"]:], device, job.get("trace"))
    if base == "studio":
        from finetune.recipe import layer_graphs

        result["layer_graphs"] = layer_graphs.status()
    measured = rows[job["warmup"]:]
    med = statistics.median(r["tokens_per_s"] for r in measured)
    med_tflops = statistics.median(r["tflops"] for r in measured)
    result.update(steps=rows, tokens_per_s=med, tflops=med_tflops, mfu=(med_tflops * 1e12 / peak) if peak else None,
                  losses=[r["loss"] for r in rows], slowest_vs_median=steadiness([r["tokens_per_s"] for r in measured]),
                  **_mem(device))
    return result


def steadiness(rates: list[float]) -> float | None:
    """How much slower the slowest measured step ran than the median one (1.0 = all alike): median rate over the
    lowest rate, i.e. the slowest step's time over the median step's time at equal tokens per step."""
    return statistics.median(rates) / min(rates) if rates and min(rates) > 0 else None


def _longest(job, step, device, vocab, result) -> dict:
    """The longest single sequence (batch 1) for which one full training step fits under the memory cap."""
    import torch

    from finetune.bench.models import make_batches

    tried = []
    best = None
    deadline = time.monotonic() + job.get("time_budget_s", 240)
    for n in job.get("ladder") or LADDER:
        if time.monotonic() > deadline:
            tried.append({"seq": n, "ok": None, "why": "time budget"})
            break
        examples = make_batches(n, 1, 1, vocab, seed=n)[0]
        torch.cuda.reset_peak_memory_stats(device)
        try:
            _sync(device)
            t = time.perf_counter()
            loss = step(examples)
            _sync(device)
            dt = time.perf_counter() - t
            mem = _mem(device)
            tried.append({"seq": n, "ok": True, "seconds": dt, "tokens_per_s": n / dt, "loss": loss, **mem})
            best = tried[-1]
        except torch.OutOfMemoryError:
            tried.append({"seq": n, "ok": False, "why": "out of memory"})
            break
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            tried.append({"seq": n, "ok": False, "why": "out of memory"})
            break
    result.update(longest=best["seq"] if best else 0, tried=tried, **({} if best is None else
                  {"peak_allocated_gib": best.get("peak_allocated_gib"), "tokens_per_s": best["tokens_per_s"]}))
    return result


def main(argv: list[str]) -> int:
    job_path, out_path = argv[0], argv[1]
    job = json.loads(open(job_path, encoding="utf-8").read())
    from finetune.bench.models import write_json

    try:
        result = run_job(job)
    except BaseException as e:  # the orchestrator reports it and goes on with the next arm
        result = {"job": job, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        write_json(out_path, result)
        print(result["traceback"], file=sys.stderr)
        return 1
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
