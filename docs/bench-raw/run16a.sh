#!/bin/bash
# Device call 16a (1 x H200): the fast path's GPU tests on the final code (with the fixed pin_ahead test), then 8B
# QLoRA variable length: two naive seeds beside two studio seeds (pin_ahead on) and both Unsloth modes.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -V;
  lscpu | grep -e "Model name" -e "^CPU MHz" -e "CPU max MHz";
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,triton;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__,triton.__version__)"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_speed.py -m gpu > $OUT/gpu-tests.txt 2>&1
tail -4 $OUT/gpu-tests.txt
echo "tests done after $(( $(date +%s) - T0 )) s"
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": "var", "batch": 8, "steps": 10, "warmup": 2,
  "arms": ["naive", "studio", "unsloth:packed", "naive@1", "studio@1", "unsloth"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 585 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 30 )) --hard-s $(( REM - 6 )) --timeout-s 150 > $OUT/bench-log.txt 2>&1
grep -A12 "^####" $OUT/bench-log.txt | cut -c1-260
grep "Loss parity" $OUT/bench-log.txt
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("arm_label"), r.get("setup_s"), r.get("error", "")[:200], "losses", [round(x, 4) for x in r.get("losses", [])])
        print("   steps", [(s["tokens"], round(s["seconds"], 3)) for s in r.get("steps", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
