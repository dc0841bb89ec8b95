"""Direct preference optimisation: the adapter learns to prefer each pair's chosen answer over its rejected one,
relative to a reference model, which is the same model with the adapter switched off (peft's disable_adapter:
no second copy in memory). Continuing an SFT adapter (lora.init_adapter) keeps the base as the reference.

The loss variants are the ones TRL names by `loss_type`; they are written here because TRL keeps them inside its
DPOTrainer (a method reading the trainer's own state), and this recipe keeps the studio's one training loop.
Metrics per logged step use TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected.
"""
from __future__ import annotations

import logging

from finetune.recipe import distributed
from finetune.recipe.checkpoints import TrainError
from finetune.recipe.heads import final_hidden, output_head
from finetune.recipe.sft import SFTRecipe

log = logging.getLogger("finetune.train")

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


# Trained positions per output-head chunk: one chunk's fp32 logits ([chunk x vocab]) exist at a time.
LOGP_CHUNK = 1024


def token_logps(head, hidden, targets):
    """log p(target) at each position of one chunk (its logits live only inside this call)."""
    import torch

    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model, batch: dict, chunk_size: int = LOGP_CHUNK, chunked: bool = True):
    """Per row: the summed log-probability of its label tokens and how many there are. The output head runs over
    the trained positions' final hidden states in chunks inside activation checkpoints: no [rows x tokens x vocab]
    tensor is ever made, in the forward or the backward. `chunked=False` (FSDP, which keeps the head sharded outside
    the model's forward) takes the whole batch's logits from the model instead."""
    import torch
    from torch.utils.checkpoint import checkpoint

    labels = batch["labels"][:, 1:]
    mask = labels != -100
    targets = labels[mask]
    if chunked:
        hidden, head = final_hidden(model, batch)[:, :-1][mask], output_head(model)
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden, head = model(**inputs, use_cache=False).logits[:, :-1][mask], torch.nn.Identity()
        chunk_size = max(1, targets.numel())
    parts = []
    for i in range(0, targets.numel(), chunk_size):
        args = (head, hidden[i:i + chunk_size], targets[i:i + chunk_size])
        parts.append(checkpoint(token_logps, *args, use_reentrant=False) if torch.is_grad_enabled() and chunked
                     else token_logps(*args))
    per_token = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    rows = mask.nonzero(as_tuple=True)[0]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, per_token)
    return sums, mask.sum(-1)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0):
    """Per-pair losses and the implicit rewards beta * (log pi - log ref) of each side."""
    import torch.nn.functional as F

    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * logits)
    else:
        raise ValueError(f"dpo.loss_type: unknown {loss_type!r}")
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


class DPORecipe(SFTRecipe):
    """LoRA preference tuning on (prompt, chosen, rejected) pairs."""

    def _setup_data(self) -> None:
        from finetune import preference

        prepared = preference.prepare(self.config.data, self.tokenizer)
        if not prepared.train:
            raise TrainError(f"data.path {self.config.data.path!r}: no preference pairs left after preparation")
        log.info("data: %d pairs (%d validation)", len(prepared.train), len(prepared.validation))
        self.train_examples, self.validation_examples, self.data_stats = prepared.train, prepared.validation, prepared.stats

    def _setup_optimizer(self) -> None:
        super()._setup_optimizer()
        self.padding_free = False  # each row's log-probability is summed on its own: rows stay apart
        self._window = {k: 0.0 for k in METRICS} | {"pairs": 0}
        self.last_metrics: dict = {}

    def collate(self, examples: list[dict]) -> dict:
        """All chosen rows, then all rejected rows, in one padded batch (one forward pass for both)."""
        from finetune import data as D

        rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        batch = D.collate(rows, self.tokenizer.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def micro_batch_positions(self, examples: list[dict]) -> int:
        rows = [len(e[side]["input_ids"]) for e in examples for side in ("chosen", "rejected")]
        return len(rows) * max(rows)

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss_step(self, batch: dict, num_items_in_batch: int):
        """The summed pair loss over `num_items_in_batch` pairs; the reference pass runs with the adapter off."""
        import torch

        dc = self.config.dpo
        chunked = not distributed.is_fsdp(self.accelerator)
        logps, counts = sequence_logps(self.model, batch, chunked=chunked)
        with torch.no_grad(), self.accelerator.unwrap_model(self.model).disable_adapter():
            ref_logps, _ = sequence_logps(self.model, batch, chunked=chunked)
        if dc.loss_type == "ipo":  # IPO compares mean token log-probabilities
            logps, ref_logps = logps / counts.clamp(min=1), ref_logps / counts.clamp(min=1)
        n = batch["input_ids"].shape[0] // 2
        losses, r_chosen, r_rejected = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], dc.beta,
                                                dc.loss_type, dc.label_smoothing)
        if self.model.training:
            self._accumulate(r_chosen, r_rejected, logps[:n].detach(), logps[n:].detach())
        return losses.sum() / num_items_in_batch

    def _accumulate(self, r_chosen, r_rejected, logp_chosen, logp_rejected) -> None:
        w = self._window
        w["rewards/chosen"] += float(r_chosen.sum())
        w["rewards/rejected"] += float(r_rejected.sum())
        w["rewards/accuracies"] += float((r_chosen > r_rejected).float().sum())
        w["rewards/margins"] += float((r_chosen - r_rejected).sum())
        w["logps/chosen"] += float(logp_chosen.sum())
        w["logps/rejected"] += float(logp_rejected.sum())
        w["pairs"] += len(r_chosen)

    def step_metrics(self) -> dict:
        n = max(1, self._window["pairs"])
        out = {k: round(self._window[k] / n, 6) for k in METRICS}
        self._window = {k: 0.0 for k in METRICS} | {"pairs": 0}
        self.last_metrics = out
        return out

    def objective_record(self) -> dict:
        dc = self.config.dpo
        return {"objective": "dpo", "reference": "the base model (adapter disabled)",
                "dpo": {"beta": dc.beta, "loss_type": dc.loss_type, "label_smoothing": dc.label_smoothing,
                        "final": self.last_metrics}}
