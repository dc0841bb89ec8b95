#!/bin/bash
# Device call A (2 x H200): 8B QLoRA DDP scaling, 1 vs 2 GPUs; the fast checkpoint under DDP on/off; 1 GPU without it.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; python3 -V;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__)"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
S="python3 -m finetune.bench.scaling --model llama-3-8b --models-dir /root/bm --strategy ddp --steps 10 --seq 2048 --batch 2 --gradient-checkpointing --timeout 240"
run() { local name=$1; shift; echo "== $name $(( $(date +%s) - T0 )) s"; env "$@" > $OUT/$name-log.txt 2>&1; grep -o "\"state\": \"[a-z]*\"\|\"tokens_per_second\": [0-9.]*\|\"rank_peak_memory_mb\": \[[^]]*\]" $OUT/$name-log.txt; }
run q12 $S --processes 1,2 --quantization 4bit --out $OUT/q12
run q2fc STUDIO_SPEED=+ddp_fast_checkpoint $S --processes 2 --quantization 4bit --out $OUT/q2fc
run q1nofc STUDIO_SPEED=-fast_checkpoint $S --processes 1 --quantization 4bit --out $OUT/q1nofc
echo "all done after $(( $(date +%s) - T0 )) s"
