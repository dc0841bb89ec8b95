#!/bin/bash
# Device call 14c (1 x H200): liger's Triton RoPE is right on isolated tensors (14b), yet moves the 8B QLoRA step-1
# loss. Log what it gets inside the studio's model (layouts, dtypes, cos) and its error there, for 8B and 1B QLoRA.
export PYTHONPATH=$PWD/.carry/diag:$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 1, "warmup": 0, "arms": ["studio"]},
 {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "steps": 1, "warmup": 0, "arms": ["studio"]},
 {"shape": "llama-3.2-1b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 1, "warmup": 0, "arms": ["studio"]}]
J
cp /tmp/plan.json $OUT/plan.json
ROPE_DIAG=$OUT/rope-diag.txt timeout 400 python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm \
  --raw $OUT/ab --budget-s 380 --hard-s 390 --timeout-s 200 > $OUT/bench-log.txt 2>&1
grep -E "start|done" $OUT/bench-log.txt
cut -c1-400 $OUT/rope-diag.txt | awk 'NR<=6 || /call (1|2|30|31|32|33|34) /'
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("shape"), j.get("mode"), j.get("arm_label"), r.get("error", "")[:300], "losses", [round(x, 5) for x in r.get("losses", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
