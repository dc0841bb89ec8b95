#!/bin/bash
# Device call 16b (1 x H200): the fixed-length ratios again on this session's host: 8B QLoRA 2 x 2048, studio and
# Unsloth, two seeds each, interleaved; then 8B bf16 LoRA, studio and Unsloth. 20 measured steps.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc;
  lscpu | grep -e "Model name" -e "^CPU MHz" -e "CPU max MHz"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio", "unsloth", "studio@1", "unsloth@1"]},
 {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio", "unsloth"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 590 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 20 )) --hard-s $(( REM - 5 )) --timeout-s 150 > $OUT/bench-log.txt 2>&1
grep -A8 "^####" $OUT/bench-log.txt | cut -c1-260
grep "Loss parity" $OUT/bench-log.txt
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("case_label", ""), j.get("arm_label"), r.get("setup_s"), r.get("error", "")[:200])
        print("   step s", [round(s["seconds"], 3) for s in r.get("steps", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
