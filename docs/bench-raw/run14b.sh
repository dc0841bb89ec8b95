#!/bin/bash
# Device call 14b (1 x H200): liger's RoPE is what moves the 8B QLoRA step-1 loss (14a). Which implementation runs
# (liger 0.8.5 dispatches rope to a CuTe DSL kernel on sm_90+ for head_dim >= 128 and >= 131072 q rows with grad),
# and is it right on the studio's stacked q/k/v layout? Then the studio arm with the Triton rope forced.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
python3 -c "import cutlass, cutlass.cute; print('cutlass', getattr(cutlass, '__version__', '?'))" 2>&1 | tail -1
timeout 120 python3 .carry/rope_check.py > $OUT/rope-check.txt 2>&1; cat $OUT/rope-check.txt | grep -v Warning
echo "rope check done after $(( $(date +%s) - T0 )) s"
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 3, "warmup": 0, "arms": ["studio"]}]
J
cp /tmp/plan.json $OUT/plan.json
LIGER_KERNEL_IMPL_ROPE=triton timeout 300 python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm \
  --raw $OUT/ab --budget-s 280 --hard-s 290 --timeout-s 200 > $OUT/bench-log.txt 2>&1
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("arm_label"), r.get("error", "")[:300], "losses", [round(x, 5) for x in r.get("losses", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
