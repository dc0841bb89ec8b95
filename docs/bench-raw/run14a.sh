#!/bin/bash
# Device call 14a (1 x H200): which liger kernel moves the studio's step-1 loss on 8B QLoRA 2 x 2048 away from naive?
# Each arm turns one kernel off; then the fast path's GPU tests (incl. the one that switches kernels off one by one).
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -V;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,triton;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__,triton.__version__)"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 3, "warmup": 0,
  "arms": ["naive", "studio", "studio:-liger_rope", "studio:-liger_rms_norm", "studio:-liger_swiglu",
           "studio:-liger_flce", "studio:-liger"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 380 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 20 )) --hard-s $(( REM - 6 )) --timeout-s 200 > $OUT/bench-log.txt 2>&1
tail -20 $OUT/bench-log.txt
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" not in j:
        continue
    print(j.get("arm_label"), round(r.get("tokens_per_s") or 0), r.get("peak_allocated_gib"), r.get("speedups"), r.get("error", "")[:300])
    print("  losses", [round(x, 5) for x in r.get("losses", [])])
P
echo "bench done after $(( $(date +%s) - T0 )) s"
REM=$(( 560 - ($(date +%s) - T0) ))
timeout $REM python3 -m pytest -q -rs -p no:cacheprovider tests/test_speed.py -m gpu > $OUT/gpu-tests.txt 2>&1
tail -15 $OUT/gpu-tests.txt
echo "all done after $(( $(date +%s) - T0 )) s"
