#!/bin/bash
# Device call D (2 x H200): FSDP bf16 LoRA on a CodeLlama-34B shape over 2 GPUs (RAM-efficient loading).
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; df -h /root | tail -1; } > $OUT/env.txt 2>&1
T0=$(date +%s)
timeout 300 python3 -c "from pathlib import Path; from finetune.bench.models import build_model; print(build_model('codellama-34b', Path('/root/bm')))" 2>&1 | tr '\r' '\n' | tail -2
echo "built after $(( $(date +%s) - T0 )) s"
REM=$(( 570 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune.bench.scaling --models-dir /root/bm --model codellama-34b --steps 6 --seq 2048 \
  --gradient-checkpointing --quantization none --strategy fsdp --dtype bfloat16 --batch 1 --processes 2 \
  --timeout $(( REM - 10 )) --out $OUT/f34 > $OUT/f34-log.txt 2>&1
grep -o "\"state\": \"[a-z]*\"\|\"tokens_per_second\": [0-9.]*\|\"rank_peak_memory_mb\": \[[^]]*\]\|\"losses\": \[[^]]*\]" $OUT/f34-log.txt
f=$(ls -t $(find /tmp/scaling-* -name train.log) | head -1); tr '\r' '\n' < $f | grep -v "^training\|^Loading\|liger_kernel" | tail -25 > $OUT/f34-train-tail.log
echo "all done after $(( $(date +%s) - T0 )) s"
