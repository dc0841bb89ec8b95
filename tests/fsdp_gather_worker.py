"""Run by tests/test_scaling.py under torchrun (2 CPU processes, gloo): LoRA on a tiny random Llama sharded with
torch's FSDP2 fully_shard, one backward, then recipe.distributed.adapter_state_dict gathers the LoRA tensors whole
and peft saves them. Prints one JSON line on rank 0. argv: model folder, output folder."""
import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard

from finetune import model as M
from finetune.config import JobConfig
from finetune.recipe import distributed

dist.init_process_group("gloo")
torch.manual_seed(0)  # as the recipe's set_seed: every rank initialises the same LoRA weights (FSDP2 broadcasts none)
cfg = JobConfig.parse({"model": {"name_or_path": sys.argv[1], "quantization": "none", "torch_dtype": "float32"}})
model = M.apply_lora(M.load_model(cfg.model, for_training=True), cfg.lora, gradient_checkpointing=True)
for name, p in model.named_parameters():
    if "lora_B" in name:
        p.data.normal_()  # non-zero, so the gathered values are worth comparing
whole = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
ids = torch.randint(0, 500, (2, 16))
model(input_ids=ids, labels=ids).loss.backward()
accelerator = types.SimpleNamespace(distributed_type=DistributedType.FSDP, unwrap_model=lambda m: m,
                                    is_main_process=dist.get_rank() == 0)
gathered = distributed.adapter_state_dict(accelerator, model)
if dist.get_rank() == 0:
    model.save_pretrained(sys.argv[2], save_embedding_layers=False, state_dict=gathered)
    saved = load_file(str(Path(sys.argv[2]) / "adapter_model.safetensors"))
    print(json.dumps({"sharded": type(next(p for p in model.parameters() if p.requires_grad)).__name__,
                      "same_names": sorted(gathered) == sorted(whole), "tensors": len(gathered), "saved": len(saved),
                      "max_diff": max(float((gathered[k] - whole[k]).abs().max()) for k in whole)}))
# Both ranks tear down together: a rank leaving while rank 0 still saves aborts in gloo's teardown under load.
dist.barrier()
dist.destroy_process_group()
