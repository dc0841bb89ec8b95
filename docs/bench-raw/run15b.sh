#!/bin/bash
# Device call 15b (1 x H200): the issue's fixed-length cases on the final code, studio and Unsloth back to back in one
# lease, 20 measured steps after 3 warm-up (as run 12); the real job beside the 8B QLoRA arm.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -V;
  lscpu | grep -e "Model name";
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,triton;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__,triton.__version__)"; } > $OUT/env.txt 2>&1
T0=$(date +%s)
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio", "unsloth", "recipe"]},
 {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio", "unsloth"]},
 {"shape": "llama-3.2-1b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio", "unsloth"]},
 {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3, "checkpointed_layers": 16,
  "arms": ["studio"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 585 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 25 )) --hard-s $(( REM - 5 )) --timeout-s 150 > $OUT/bench-log.txt 2>&1
grep -A8 "^####" $OUT/bench-log.txt | cut -c1-230
cat $OUT/ab/scheduler.log | tail -14
echo "all done after $(( $(date +%s) - T0 )) s"
