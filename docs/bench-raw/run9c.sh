#!/bin/bash
# Device call C (2 x H200): FSDP bf16 LoRA with RAM-efficient loading (8B, then a 32B shape), and the loss-curve
# references of the same global batch on one GPU (plain path and fast path) and DDP 2 x batch 1.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; python3 -V; df -h /root | tail -1; free -g | head -2;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__)"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
S="python3 -m finetune.bench.scaling --models-dir /root/bm --steps 10 --seq 2048 --gradient-checkpointing --quantization none"
run() { local name=$1; shift; echo "== $name $(( $(date +%s) - T0 )) s"; env "$@" > $OUT/$name-log.txt 2>&1; grep -o "\"state\": \"[a-z]*\"\|\"tokens_per_second\": [0-9.]*\|\"rank_peak_memory_mb\": \[[^]]*\]\|\"error\": \"[^\"]*\"" $OUT/$name-log.txt; }
run f8 $S --model llama-3-8b --strategy fsdp --dtype bfloat16 --batch 1 --processes 2 --timeout 200
run p1 STUDIO_SPEED=none $S --model llama-3-8b --strategy ddp --batch 2 --processes 1 --timeout 150
run d2 $S --model llama-3-8b --strategy ddp --batch 1 --processes 2 --timeout 150
echo "== build 32b $(( $(date +%s) - T0 )) s"
timeout $(( 560 - ($(date +%s) - T0) )) python3 -c "from pathlib import Path; from finetune.bench.models import build_model; print(build_model('qwen2.5-32b', Path('/root/bm')))" > $OUT/build32-log.txt 2>&1; tail -2 $OUT/build32-log.txt
REM=$(( 585 - ($(date +%s) - T0) ))
[ $REM -gt 60 ] && run f32 timeout $REM $S --model qwen2.5-32b --strategy fsdp --dtype bfloat16 --batch 1 --processes 2 --steps 6 --timeout $(( REM - 10 ))
for f in $(ls -t $(find /tmp/scaling-* -name train.log -newer $OUT/env.txt 2>/dev/null) | head -2); do tail -c 3000 $f > $OUT/tail-$(basename $(dirname $f)).log; done
echo "all done after $(( $(date +%s) - T0 )) s"; nvidia-smi --query-gpu=memory.used --format=csv
