"""What a run over several processes (DDP or FSDP through accelerate) needs beyond one process: a loss normalised
by the label tokens of every rank, per-rank numbers gathered for the one writer (rank 0) and the adapter's weights
gathered out of FSDP's shards. (The world-size check on resume is in checkpoints.py.)"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def global_sum(accelerator, value: int) -> int:
    """`value` summed over all processes (itself when there is one)."""
    if accelerator.num_processes == 1:
        return value
    import torch

    t = torch.tensor([float(value)], device=accelerator.device)
    return int(accelerator.reduce(t, reduction="sum").item())


@dataclass
class RankStep:
    """One optimizer step seen by every rank: the step's loss over all ranks (each rank's summed token loss over
    the step's label tokens of all ranks, summed: exactly the loss of one process taking the whole global batch),
    input tokens summed, and per rank its own loss, label tokens and memory."""
    loss: float
    tokens: int
    rank_loss: list[float]
    rank_label_tokens: list[int]
    rank_memory_mb: list[float | None]
    rank_peak_memory_mb: list[float | None]


def gather_step(accelerator, contribution: float, own_labels: int, all_labels: int, tokens: int,
                memory: tuple[float | None, float | None]) -> RankStep:
    """Collect one step's numbers from every rank (every rank must call this; only rank 0 writes them).
    contribution: this rank's token-loss sum divided by all ranks' label tokens."""
    import torch

    now, peak = memory
    row = [contribution, float(own_labels), float(tokens), now if now is not None else -1.0,
           peak if peak is not None else -1.0]
    t = torch.tensor(row, dtype=torch.float64 if accelerator.device.type == "cpu" else torch.float32,
                     device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.gather(t.unsqueeze(0))
    table = t.reshape(-1, 5).tolist()
    total = max(1, all_labels)
    return RankStep(
        loss=sum(r[0] for r in table),
        tokens=int(sum(r[2] for r in table)),
        rank_loss=[round(r[0] * total / r[1], 6) if r[1] else None for r in table],
        rank_label_tokens=[int(r[1]) for r in table],
        rank_memory_mb=[round(r[3], 1) if r[3] >= 0 else None for r in table],
        rank_peak_memory_mb=[round(r[4], 1) if r[4] >= 0 else None for r in table],
    )


def adapter_state_dict(accelerator, model) -> dict | None:
    """Under FSDP, the trainable (LoRA) tensors gathered whole from their shards (every rank must call this; only
    the main process keeps them); None otherwise (the unwrapped model saves itself)."""
    if not is_fsdp(accelerator):
        return None
    out = {}
    for name, p in accelerator.unwrap_model(model).named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            if accelerator.is_main_process:
                out[name] = full.detach().cpu()
    return out


def skip_fast_path_under_fsdp(accelerator, model_cfg) -> bool:
    """The GPU fast path fuses LoRA with whole base weights and reads lm_head's weight for the fused loss; FSDP keeps
    those sharded, so under FSDP the plain peft + transformers model trains (said in the log; studio.json's speedups
    is empty)."""
    if not is_fsdp(accelerator):
        return False
    log.info("speed-ups: off under launch.strategy fsdp (the fused kernels need whole, unsharded weights)")
    if model_cfg.quantization == "4bit":
        log.info("model.bnb_4bit_quant_storage %s: FSDP shards the 4-bit weights stored in it",
                 model_cfg.bnb_4bit_quant_storage)
    return True
