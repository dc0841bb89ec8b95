"""Supervised fine-tuning, top to bottom: setup -> train -> save -> evaluate_adapter.

The run folder (finetune/rundir.py) is the interface to everything else: status.json at every logged step,
metrics.jsonl, checkpoints/ for --resume. The finished adapter is published atomically into the adapter store with
studio.json and a model card (finetune/recipe/provenance.py).

A later objective subclasses SFTRecipe and overrides `_setup_data` (its examples) and `loss_step` (its loss); the
loop, checkpoints, logging and publishing stay the same.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from finetune.config import JobConfig
from finetune.recipe import checkpoints as C
from finetune.recipe import distributed
from finetune.recipe import provenance as P
from finetune.recipe.checkpoints import Progress, TrainError
from finetune.recipe.references import init_adapter_path
from finetune.recipe.tracker import RunTracker, memory_mb
from finetune.rundir import CHECKPOINTS, JOB_YAML

log = logging.getLogger("finetune.train")


# --- batches -----------------------------------------------------------------------------------------------------
def build_optimizer(params, tc):
    """The optimizer `training.optim` names, over the trainable (LoRA) parameters."""
    import torch

    if tc.optim == "adamw_torch":
        return torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    import bitsandbytes as bnb

    # Paged optimizer states live in unified memory, which only a CUDA device has.
    paged = tc.optim == "paged_adamw_8bit" and torch.cuda.is_available()
    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return cls(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)


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


@dataclass
class StepResult:
    """What one optimizer step did."""
    loss: float           # the step's loss, summed over its micro-batches (each normalised by the step's labels)
    grad_norm: float      # before clipping
    learning_rate: float  # the rate this step used
    tokens: int           # input tokens (padding excluded) of its micro-batches
    labels: int = 0       # label tokens of this process's micro-batches
    all_labels: int = 0   # label tokens of the step over every process (the loss's denominator)


def run_micro_batches(recipe, epoch_limit: int = 16):
    """This process's micro-batches (lists of examples) over the run's epochs, looking at most `epoch_limit` epochs
    ahead: each epoch's shuffle is fixed in advance."""
    epochs = min(epoch_limit, math.ceil(recipe.total_steps / max(1, recipe.steps_per_epoch)))
    for epoch in range(epochs):
        for group in recipe.epoch_groups(epoch):
            for idx in group:
                yield [recipe.train_examples[i] for i in idx]


def pin_offload_ahead(recipe, micro_batches) -> None:
    """Pin now the host memory the offload needs for the largest of `micro_batches` (lists of examples, read only
    where the offload is on: the speed piece pin_ahead), so that no training step waits for it."""
    from finetune.recipe.speed import reserve_offload

    positions = (recipe.micro_batch_positions(b) for b in micro_batches)
    pinned = reserve_offload(recipe.accelerator.unwrap_model(recipe.model), positions)
    if pinned:
        recipe.speedups.append("pin_ahead")
        log.info("offload: %.2f GiB of pinned host memory for the run's largest micro-batch", pinned / 2**30)


class ObjectiveHooks:
    """What an objective may override besides `_setup_data` and `loss_step` (the SFT answers here)."""

    def collate(self, examples: list[dict]) -> dict:
        """Examples -> one batch of tensors on the device (packed into one row on a GPU)."""
        from finetune import data as D

        batch = D.collate(examples, self.tokenizer.pad_token_id, padding_free=self.padding_free)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def micro_batch_positions(self, examples: list[dict]) -> int:
        """The token positions collate() makes of these examples: what each decoder layer's input holds."""
        lengths = [len(ex["input_ids"]) for ex in examples]
        return sum(lengths) if self.padding_free else len(lengths) * max(lengths)

    def count_items(self, batch: dict) -> int:
        """What loss_step's sum is normalised by: the batch's label tokens (a pair objective counts pairs)."""
        return count_label_tokens(batch)

    def objective_record(self) -> dict:
        """What studio.json says about the objective (and the other models it learned from)."""
        return {"objective": "sft"}

    def step_metrics(self) -> dict:
        """The objective's own metrics for the steps since the last logged one (merged into its metrics row)."""
        return {}


def freeze_heap() -> None:
    """Move every object alive now (model, optimizer, data) out of the cyclic collector's sight: a full collection
    during training then scans only what the steps create, instead of stalling one step while it walks the model's
    objects."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_heap():
    """freeze_heap() for the block; unfrozen after, so a model dropped later has its reference cycles collected."""
    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()


class SFTRecipe(ObjectiveHooks):
    """LoRA supervised fine-tuning on the assistant tokens of chat-rendered examples."""

    def __init__(self, config: JobConfig, run_dir: str | Path | None = None):
        import torch
        from accelerate import Accelerator

        self.config, self.tc = config, config.training
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # cpu=True without CUDA: processes started by torchrun then join over gloo (MULTI_CPU), see jobs/launch.py
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process
        # Without a run folder (the benchmark) nothing is written.
        self.tracker = RunTracker(self.run_dir, config.adapter_name, enabled=self.writes_run_folder)
        self.status = self.tracker.status
        self.progress = Progress(num_processes=self.accelerator.num_processes)
        self.train_examples: list = []
        self.validation_examples: list = []
        self.data_stats: dict = {}
        self.eval_loss: float | None = None

    # --- setup ---------------------------------------------------------------------------------------------------
    def setup(self, resume: bool = False, data: bool = True) -> None:
        """Tokenizer, data, model and optimizer; with `resume`, the run folder's last checkpoint. data=False prepares
        only the model and optimizer (the benchmark feeds its own batches to train_step)."""
        from accelerate.utils import set_seed

        from finetune import model as M

        if self.writes_run_folder and not (self.run_dir / JOB_YAML).exists():
            self.config.save(self.run_dir / JOB_YAML)  # so the run can be resumed and read back like a studio job
        self.status.update(phase="loading")
        set_seed(self.tc.seed)
        self.tokenizer = M.load_tokenizer(self.config.model)
        if data:
            self.status.update(phase="preparing_data")
            self._setup_data()
        self.status.update(phase="loading")
        self._setup_model()
        self._setup_optimizer()
        if data:
            pin_offload_ahead(self, run_micro_batches(self))
        if resume:
            self._resume()

    @property
    def writes_run_folder(self) -> bool:
        return self.main and self.run_dir is not None

    def _setup_data(self) -> None:
        """The training and validation examples (token ids and labels), and the dataset's statistics."""
        from finetune import data as D

        prepared = D.prepare(self.config.data, self.tokenizer)
        if not prepared.train:
            raise TrainError(f"data.path {self.config.data.path!r}: no training examples left after preparation")
        log.info("data: %s", json.dumps(prepared.stats, default=str))
        self.train_examples, self.validation_examples, self.data_stats = prepared.train, prepared.validation, prepared.stats

    def _setup_model(self) -> None:
        """The base model with LoRA applied and the GPU fast path patched in."""
        from finetune import model as M
        from finetune.recipe.speed import patch_model_for_speed

        mc = self.config.model
        self.resolved = M.resolve_model(mc.name_or_path, mc.revision)
        model = M.load_model(mc, for_training=True)
        self.model = M.apply_lora(model, self.config.lora, gradient_checkpointing=self.tc.gradient_checkpointing,
                                  init_adapter=init_adapter_path(self.config),
                                  checkpointed_layers=self.tc.gradient_checkpointing_layers)
        fsdp = distributed.skip_fast_path_under_fsdp(self.accelerator, mc)
        self.speedups = [] if fsdp else patch_model_for_speed(self.model, self.tc)
        self.trainable, self.total_params = self.model.get_nb_trainable_parameters()
        log.info("LoRA: %d trainable of %d parameters (%.2f%%); speed-ups: %s", self.trainable, self.total_params,
                 100 * self.trainable / self.total_params, ", ".join(self.speedups) or "none")

    def _setup_optimizer(self) -> None:
        """Optimizer, schedule and step counts; the model and optimizer wrapped by accelerate."""
        from transformers import get_scheduler

        tc, acc = self.tc, self.accelerator
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.params, tc)
        # Steps: each process gets its share of the micro-batches; `accumulation` micro-batches make one step.
        self.steps_per_epoch = len(self.epoch_groups(0))
        self.total_steps = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.num_train_epochs * self.steps_per_epoch))
        self.scheduler = get_scheduler(tc.lr_scheduler_type, optimizer, num_training_steps=self.total_steps,
                                       num_warmup_steps=math.ceil(tc.warmup_ratio * self.total_steps))
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP swaps them for sharded ones
        acc.register_for_checkpointing(self.scheduler)
        C.install_lora_only_checkpoints(acc)
        # packed rows need the fast path's attention kernels (a GPU, and no FSDP)
        self.padding_free = tc.padding_free and acc.device.type == "cuda" and not distributed.is_fsdp(acc)

    def _resume(self) -> None:
        loaded = C.load_latest(self.accelerator, self.run_dir)
        if loaded is None:
            log.info("--resume: no checkpoint in %s yet; starting from step 0", self.run_dir / CHECKPOINTS)
            return
        self.progress, path = loaded
        self.tracker.metrics.truncate_after(self.progress.global_step)
        log.info("resumed from %s: step %d of %d, epoch %d, %d steps into it", path.name, self.progress.global_step,
                 self.total_steps, self.progress.epoch, self.progress.groups_done_in_epoch)

    # --- one step ------------------------------------------------------------------------------------------------
    def epoch_groups(self, epoch: int) -> list[list[list[int]]]:
        """This process's optimizer steps of one epoch, each a list of micro-batches of example indices."""
        acc, tc = self.accelerator, self.tc
        batches = epoch_batches(len(self.train_examples), tc.per_device_train_batch_size, tc.seed, epoch,
                                acc.process_index, acc.num_processes)
        return step_groups(batches, tc.gradient_accumulation_steps)


    def loss_step(self, batch: dict, num_items_in_batch: int):
        """The one place where forward and loss meet: the summed token loss over `num_items_in_batch` label tokens."""
        return self.model(**batch, num_items_in_batch=num_items_in_batch).loss

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """One optimizer step over collated micro-batches (gradient accumulation, clipping, schedule)."""
        acc = self.accelerator
        # Normalise by the label tokens of the whole step, not per micro-batch: the accumulated gradient then equals
        # that of one big batch, however the tokens fall across micro-batches.
        # Over several processes, by the label tokens of all of them: DDP and FSDP average the gradients over the
        # ranks, so each rank's loss is scaled by the world size to make that average the one-process gradient.
        n_labels = sum(self.count_items(b) for b in micro_batches)
        all_labels = max(1, distributed.global_sum(acc, n_labels))
        losses, tokens = [], 0
        for j, batch in enumerate(micro_batches):
            sync = j == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                loss = self.loss_step(batch, all_labels)
                acc.backward(loss * acc.num_processes if acc.num_processes > 1 else loss)
            losses.append(loss.detach())
            tokens += count_input_tokens(batch)
        max_norm = self.tc.max_grad_norm if self.tc.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(self.params, max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Read back only now: a read before the update would idle the device while the host queues clip and update.
        return StepResult(loss=sum(float(x) for x in losses), grad_norm=float(grad_norm), learning_rate=lr,
                          tokens=tokens, labels=n_labels, all_labels=all_labels)

    def evaluate_loss(self) -> float | None:
        """Token-weighted mean loss on the validation examples."""
        import torch

        if not self.validation_examples:
            return None
        self.model.eval()
        total, count, bs = 0.0, 0, self.tc.per_device_train_batch_size
        with torch.no_grad():
            for i in range(0, len(self.validation_examples), bs):
                batch = self.collate(self.validation_examples[i:i + bs])
                n = self.count_items(batch)
                if n == 0:
                    continue
                total += float(self.loss_step(batch, n)) * n
                count += n
        self.model.train()
        return total / count if count else None

    # --- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> None:
        state = self.progress
        self.tracker.start(state, self.total_steps, self.steps_per_epoch)
        self.model.train()
        with frozen_heap():
            while state.global_step < self.total_steps:
                for group in self.epoch_groups(state.epoch)[state.groups_done_in_epoch:]:
                    if state.global_step >= self.total_steps:
                        break
                    result = self.train_step([self.collate([self.train_examples[i] for i in idx]) for idx in group])
                    self._after_step(result)
                else:
                    state.epoch += 1
                    state.groups_done_in_epoch = 0
        self.tracker.close()
        self.eval_loss = self.evaluate_loss()
        self.tracker.log_eval_loss(state.global_step, self.eval_loss, update_status=False)

    def _after_step(self, result: StepResult) -> None:
        """Progress, then the step's log row, periodic validation and checkpoint."""
        state, tc = self.progress, self.tc
        state.global_step += 1
        state.groups_done_in_epoch += 1
        ranks = distributed.gather_step(self.accelerator, result.loss, result.labels, result.all_labels, result.tokens,
                              memory_mb())
        self.tracker.record(state, ranks.loss, ranks.tokens, ranks)
        step, last = state.global_step, state.global_step == self.total_steps
        if step % tc.logging_steps == 0 or last:
            self.tracker.log_step(state, result.learning_rate, result.grad_norm, self.step_metrics())
        if tc.eval_steps and step % tc.eval_steps == 0 and not last:
            self.tracker.log_eval_loss(step, self.evaluate_loss())
        if tc.save_steps and step % tc.save_steps == 0 and not last:
            saved_at = C.save_checkpoint(self.accelerator, self.run_dir, self.tracker.snapshot(state),
                                         tc.save_total_limit)
            log.info("checkpoint %s", saved_at.name)

    # --- save and evaluate ---------------------------------------------------------------------------------------
    def save(self) -> dict:
        """Publish the adapter with its studio.json and model card; returns studio.json (empty off the main process)."""
        metrics = self.tracker.summary(self.progress, self.eval_loss)
        self.status.update(phase="saving", step=self.progress.global_step,
                           eval_loss=round(self.eval_loss, 6) if self.eval_loss is not None else None)
        self.accelerator.wait_for_everyone()
        weights = distributed.adapter_state_dict(self.accelerator, self.model)
        meta: dict = {}
        if self.main:
            base = P.base_model_record(self.config, self.resolved)
            run = {"device": self.accelerator.device.type, "num_processes": self.accelerator.num_processes,
                   "strategy": self.config.launch.strategy,
                   "speedups": self.speedups, "parameters": {"trainable": self.trainable, "total": self.total_params},
                   "run_dir": str(self.run_dir)}
            meta = P.adapter_metadata(self.config, base, self.tokenizer, self.data_stats, run, metrics)
            meta.update(self.objective_record())
            P.publish_adapter(self.accelerator.unwrap_model(self.model), self.config, base, meta, state_dict=weights)
        self.accelerator.wait_for_everyone()
        return meta

    def evaluate_adapter(self, meta: dict) -> None:
        """Base vs adapter on the validation data (when enabled); the result goes into studio.json and `meta`."""
        if not (self.main and self.config.evaluation.enabled
                and importlib.util.find_spec("finetune.evaluation.evaluate") is not None):
            return
        import torch

        from finetune.store import adapters

        self.status.update(phase="evaluating")
        self.model = self.optimizer = None  # the evaluator loads its own copy of the base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ev = self.config.evaluation
        try:
            from finetune.evaluation.evaluate import evaluate

            result = evaluate(self.config.adapter_name, split="validation", max_examples=ev.max_examples,
                              max_new_tokens=ev.max_new_tokens)
            summary = {k: result.get(k) for k in ("key", "data", "settings", "metrics", "paired", "created_at", "duration_s")}
            if adapters.get_adapter(self.config.adapter_name).get("eval", {}).get("key") != summary["key"]:
                adapters.update_metadata(self.config.adapter_name, "eval", summary)
            meta["eval"] = summary
        except Exception as e:  # the adapter is saved; an evaluation problem must not fail the run
            log.warning("evaluation failed (the adapter is saved): %s: %s", type(e).__name__, e)
