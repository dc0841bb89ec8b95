#!/bin/bash
# Device call 14e (1 x H200): the final rule (fp32 rotary tables for liger's RoPE where keep_bf16 lowered a 4-bit
# model's hidden states): loss parity and speed on 1B QLoRA 2 x 2048 and on 8B QLoRA variable length, 3 naive seeds.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -V;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,triton;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__,triton.__version__)"; } > $OUT/env.txt 2>&1
T0=$(date +%s)
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3.2-1b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 10, "warmup": 2,
  "arms": ["naive", "studio", "naive@1", "studio@1", "naive@2"]},
 {"shape": "llama-3-8b", "mode": "qlora", "seq": "var", "batch": 8, "steps": 10, "warmup": 2,
  "arms": ["naive", "studio", "naive@1", "studio@1", "naive@2"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 490 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 60 )) --hard-s $(( REM - 6 )) --timeout-s 150 > $OUT/bench-log.txt 2>&1
grep -A10 "^####" $OUT/bench-log.txt | cut -c1-200
grep "Loss parity" $OUT/bench-log.txt
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("shape"), j.get("arm_label"), r.get("error", "")[:200], "losses", [round(x, 4) for x in r.get("losses", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
