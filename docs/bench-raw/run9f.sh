#!/bin/bash
# Device call F (2 x H200): seed noise of the 8B bf16 loss curve: seed 43, 1 GPU x batch 2 and 2 GPUs x batch 1.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
S="python3 -m finetune.bench.scaling --model llama-3-8b --models-dir /root/bm --steps 10 --seq 2048 --gradient-checkpointing --quantization none --strategy ddp --seed 43 --timeout 120"
$S --batch 2 --processes 1 > $OUT/s1-log.txt 2>&1
$S --batch 1 --processes 2 > $OUT/s2-log.txt 2>&1
grep -h -o "\"tokens_per_second\": [0-9.]*\|\"losses\": \[[^]]*\]" $OUT/s1-log.txt $OUT/s2-log.txt
echo "done after $(( $(date +%s) - T0 )) s"
