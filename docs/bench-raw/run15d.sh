#!/bin/bash
# Device call 15d (1 x H200): the offload's pinned buffers allocated before the first step (pin_ahead): the fast
# path's GPU tests, then 8B QLoRA variable length with and without it, interleaved, two seeds.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
date -u > $OUT/env.txt
T0=$(date +%s)
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_speed.py -m gpu > $OUT/gpu-tests.txt 2>&1
grep -e passed -e failed -e Error $OUT/gpu-tests.txt | tail -5
echo "tests done after $(( $(date +%s) - T0 )) s"
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": "var", "batch": 8, "steps": 10, "warmup": 2,
  "arms": ["studio", "studio:-pin_ahead", "studio@1", "studio:-pin_ahead@1"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 370 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 45 )) --hard-s $(( REM - 5 )) --timeout-s 100 > $OUT/bench-log.txt 2>&1
grep -A7 "^####" $OUT/bench-log.txt | cut -c1-200
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("arm_label"), r.get("setup_s"), r.get("error", "")[:200], [(s["tokens"], round(s["seconds"], 3)) for s in r.get("steps", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
