"""Run by tests/test_scaling.py under torchrun (2 CPU processes, gloo): LoRA on a tiny random Llama in
DistributedDataParallel with gradient checkpointing; one step of two micro-batches (the first under no_sync) with
torch's non-reentrant checkpoint, then the same step with the fast path's reentrant checkpoint
(recipe.speed.offload_checkpoints). Prints one JSON line on rank 0: the largest gradient difference between the two,
and between the ranks (DDP must have all-reduced both). argv: model folder."""
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from finetune import model as M
from finetune.config import JobConfig
from finetune.recipe.speed import offload_checkpoints

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
cfg = JobConfig.parse({"model": {"name_or_path": sys.argv[1], "quantization": "none", "torch_dtype": "float32"},
                       "lora": {"lora_dropout": 0.0}})
model = M.apply_lora(M.load_model(cfg.model, for_training=True), cfg.lora, gradient_checkpointing=True)
for name, p in model.named_parameters():
    if "lora_B" in name:
        p.data.normal_(std=0.02)  # non-zero, so lora_A gets a gradient too
ddp = DistributedDataParallel(model)
g = torch.Generator().manual_seed(100 + rank)  # each rank its own micro-batches, as under the recipe
batches = [torch.randint(0, 500, (2, 24), generator=g) for _ in range(2)]


def step() -> dict:
    ddp.zero_grad(set_to_none=True)
    with ddp.no_sync():
        ddp(input_ids=batches[0], labels=batches[0]).loss.backward()
    ddp(input_ids=batches[1], labels=batches[1]).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


plain = step()
layers = offload_checkpoints(model, offload=False)
fast = step()
across = 0.0
for n, t in fast.items():
    other = t.clone()
    dist.broadcast(other, src=0)
    across = max(across, float((other - t).abs().max()))
if rank == 0:
    print(json.dumps({"layers": layers, "tensors": len(fast), "grad_norm": float(torch.stack([t.norm() for t in fast.values()]).norm()),
                      "max_diff": max(float((fast[n] - plain[n]).abs().max()) for n in plain), "across_ranks": across}))
dist.barrier()  # both ranks tear down together (see fsdp_gather_worker.py)
dist.destroy_process_group()
