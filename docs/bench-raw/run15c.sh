#!/bin/bash
# Device call 15c (1 x H200): is the one-time cost of the first 5,516-token step (run 15a, step 5) the pinned buffers
# of the next power-of-two size? Time cudaHostAlloc as the offload's pool does it, then the variable-length arm with
# and without the offload.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
python3 - <<'P' 2>&1 | tee $OUT/pinned-alloc.txt
import time, torch
torch.zeros(1, device="cuda")
for mib in (32, 64):
    t = time.perf_counter()
    bufs = [torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True) for _ in range(32)]
    print(f"32 pinned buffers of {mib} MiB: {time.perf_counter() - t:.3f} s")
P
cat > /tmp/plan.json <<'J'
[{"shape": "llama-3-8b", "mode": "qlora", "seq": "var", "batch": 8, "steps": 10, "warmup": 2,
  "arms": ["studio:-offload", "studio"]}]
J
cp /tmp/plan.json $OUT/plan.json
REM=$(( 300 - ($(date +%s) - T0) ))
timeout $REM python3 -m finetune bench --plan /tmp/plan.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
  --budget-s $(( REM - 20 )) --hard-s $(( REM - 5 )) --timeout-s 120 > $OUT/bench-log.txt 2>&1
grep -A5 "^####" $OUT/bench-log.txt | cut -c1-200
python3 - <<'P'
import json, os
d = json.load(open(os.environ["OUT"] + "/ab/results.json"))
for r in d["results"].values():
    j = r.get("job", {})
    if "arm" in j:
        print(j.get("arm_label"), r.get("error", "")[:200], [(s["tokens"], round(s["seconds"], 3)) for s in r.get("steps", [])])
P
echo "all done after $(( $(date +%s) - T0 )) s"
