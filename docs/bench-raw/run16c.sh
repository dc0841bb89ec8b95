#!/bin/bash
# Device call 16c (1 x H200): the rest of the goals table on this session's host: the real job (recipe arm) beside
# the bench arm on 8B QLoRA, bf16 LoRA with 16 of 32 layers checkpointed, and 1B QLoRA against Unsloth.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
date -u > $OUT/env.txt
T0=$(date +%s)
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio", "recipe"]},
 {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3, "checkpointed_layers": 16,
  "arms": ["studio"]},
 {"shape": "llama-3.2-1b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio", "unsloth"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 440 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 20 )) --hard-s $(( REM - 5 )) --timeout-s 150 > $OUT/bench-log.txt 2>&1
grep -A6 "^####" $OUT/bench-log.txt | cut -c1-260
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("arm_label"), r.get("setup_s"), r.get("error", "")[:200])
        print("   step s", [round(s["seconds"], 3) for s in r.get("steps", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
