#!/bin/bash
# Device call 12a (1 x H200): the gpu-marked fast-path tests (the one-kernel NF4 dequantization, two graph buffers
# instead of four, the gradient handed on in place), then 8B QLoRA 2 x 2048 studio / Unsloth back to back
# (profiled), 8B bf16 LoRA studio / Unsloth, and 8B bf16 with no layer checkpointed.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -V;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,triton;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__,triton.__version__)"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_speed.py -m gpu > $OUT/gpu-tests.txt 2>&1
grep -E "^E |passed|failed|PASS|FAIL" $OUT/gpu-tests.txt | head -40
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3, "profile": 2,
  "arms": ["studio", "unsloth"]},
 {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio", "unsloth"]},
 {"shape": "llama-3-8b", "mode": "lora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3, "checkpointed_layers": 0,
  "arms": ["studio"]},
 {"shape": "llama-3-8b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 3,
  "arms": ["studio:-nf4_kernel"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 560 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 25 )) --hard-s $(( REM - 8 )) --timeout-s 200 > $OUT/bench-log.txt 2>&1
tail -25 $OUT/bench-log.txt
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
rs = d["results"]
for r in (rs.values() if isinstance(rs, dict) else rs):
    if not isinstance(r, dict) or "job" not in r or "arm" not in r["job"]:
        continue
    j = r["job"]
    print(j.get("mode"), j.get("arm_label"), j.get("checkpointed_layers"), round(r.get("tokens_per_s") or 0), r.get("mfu"),
          r.get("layer_graphs"), r.get("resident_gib"), r.get("peak_allocated_gib"), r.get("peak_reserved_gib"),
          r.get("slowest_vs_median"), r.get("error", "")[:300])
    print("  speedups", r.get("speedups"))
    p = r.get("profile") or {}
    print("  profile", {k: p.get(k) for k in ("step_wall_ms", "gpu_busy_ms", "gpu_busy_share", "kernels_per_step")})
    print("  steps", [round(x["tokens_per_s"]) for x in r.get("steps", [])], [round(x.get("loss", 0), 4) for x in r.get("steps", [])][-1:])
    for k in p.get("gpu_ms_by_kernel", [])[:12]:
        print("   ", k)
P
echo "all done after $(( $(date +%s) - T0 )) s"
