#!/bin/bash
# Device call 11a (1 x H200): the gpu-marked fast-path tests (graphs, offload), then 8B and 1B QLoRA 2 x 2048,
# studio (inputs parked from 16 MiB, copied back a layer ahead) / studio:-offload / Unsloth back to back.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -V;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__)"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
timeout 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_speed.py -m gpu -k "graph or offload or fast_path" > $OUT/gpu-tests.txt 2>&1
tail -30 $OUT/gpu-tests.txt | grep -v Warning
echo "tests done after $(( $(date +%s) - T0 )) s"
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 2,
  "arms": ["studio", "studio:-offload", "unsloth"]},
 {"shape": "llama-3.2-1b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 2,
  "arms": ["studio", "studio:-offload", "unsloth"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 570 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 25 )) --hard-s $(( REM - 8 )) --timeout-s 200 > $OUT/bench-log.txt 2>&1
tail -25 $OUT/bench-log.txt; cat $OUT/ab/tables.md 2>/dev/null | tail -20
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"]:
    j = r.get("job", {})
    print(j.get("shape"), j.get("arm"), round(r.get("tokens_per_s") or 0), r.get("layer_graphs"), round(r.get("resident_gib") or 0, 2),
          round(r.get("peak_allocated_gib") or 0, 2), round(r.get("peak_reserved_gib") or 0, 2),
          r.get("slowest_vs_median"), [round(s["tokens_per_s"]) for s in r.get("steps", [])][:6], r.get("error", "")[:300])
P
echo "all done after $(( $(date +%s) - T0 )) s"
