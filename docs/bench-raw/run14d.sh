#!/bin/bash
# Device call 14d (1 x H200): the studio with fp32 rotary tables for liger's RoPE (fp32_rope_tables): loss parity
# with three naive seeds on 8B QLoRA and 8B bf16 LoRA, 2 x 2048, beside the studio without it (-rope_fp32).
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -V;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,triton;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__,triton.__version__)"; } > $OUT/env.txt 2>&1
T0=$(date +%s)
timeout 60 python3 -m pytest -q -rs -p no:cacheprovider tests/test_speed.py -m gpu -k "rope or liger" > $OUT/gpu-tests.txt 2>&1
tail -3 $OUT/gpu-tests.txt
timeout 60 python3 .carry/rope_eq.py 2>&1 | grep tables
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 10, "warmup": 2,
  "arms": ["naive", "studio", "naive@1", "studio@1", "naive@2", "studio:-rope_fp32"]},
 {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "steps": 10, "warmup": 2,
  "arms": ["naive", "studio", "naive@1", "studio@1", "naive@2"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 560 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 20 )) --hard-s $(( REM - 6 )) --timeout-s 200 > $OUT/bench-log.txt 2>&1
grep -A12 "^####" $OUT/bench-log.txt | cut -c1-260
grep "Loss parity" $OUT/bench-log.txt
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("mode"), j.get("arm_label"), r.get("error", "")[:200], "losses", [round(x, 4) for x in r.get("losses", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
