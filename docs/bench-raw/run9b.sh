#!/bin/bash
# Device call B (2 x H200): 8B bf16 LoRA DDP 1 vs 2 GPUs (fast checkpoint now on under DDP); FSDP bf16 LoRA on 2
# GPUs with the 1-GPU run's global batch (batch 1 per GPU vs 2 on one GPU) for the loss curve and per-GPU memory.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; python3 -V;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__)"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
S="python3 -m finetune.bench.scaling --model llama-3-8b --models-dir /root/bm --steps 10 --seq 2048 --gradient-checkpointing --timeout 240"
run() { local name=$1; shift; echo "== $name $(( $(date +%s) - T0 )) s"; env "$@" > $OUT/$name-log.txt 2>&1; grep -o "\"state\": \"[a-z]*\"\|\"tokens_per_second\": [0-9.]*\|\"rank_peak_memory_mb\": \[[^]]*\]\|\"error\": \"[^\"]*\"" $OUT/$name-log.txt; }
run b12 $S --strategy ddp --batch 2 --processes 1,2 --quantization none --out $OUT/b12
run f2 $S --strategy fsdp --dtype bfloat16 --batch 1 --processes 2 --quantization none --out $OUT/f2
run q2 $S --strategy ddp --batch 2 --processes 2 --quantization 4bit --out $OUT/q2
for d in $(ls -d /tmp/scaling-* 2>/dev/null); do find $d -name train.log | while read f; do n=$(basename $(dirname $f)); cp $f $OUT/train-$n.log; done; done
echo "all done after $(( $(date +%s) - T0 )) s"
