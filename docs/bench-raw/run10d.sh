#!/bin/bash
# Device call D (1 x H200): 1B QLoRA 2 x 2048, 40 measured steps, studio (layer graphs, heap frozen) / studio:-graphs:
# is the one slow step of call C a full garbage collection?
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3.2-1b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 40, "warmup": 2,
  "arms": ["studio", "studio:-graphs"]}]
J
cp /tmp/plan.json $OUT/plan.json
timeout 150 python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/d \
  --budget-s 120 --hard-s 140 --timeout-s 100 > $OUT/bench-log.txt 2>&1
tail -4 $OUT/bench-log.txt
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/d/results.json"))
for r in d["results"].values():
    st = r.get("steps", [])
    print(r.get("job", {}).get("arm"), round(r.get("tokens_per_s") or 0), r.get("slowest_vs_median"), r.get("layer_graphs"),
          [round(s["tokens_per_s"]) for s in st], [s.get("full_gc") for s in st], r.get("error", "")[:300])
P
echo "all done after $(( $(date +%s) - T0 )) s"
