#!/bin/bash
# One device call: FSDP job tests on one GPU, the objectives bench (SFT/DPO/distill), then 1B QLoRA A/B vs Unsloth.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; python3 -V;
  python3 -c "import torch,transformers,peft,accelerate,bitsandbytes;print(torch.__version__,transformers.__version__,peft.__version__,accelerate.__version__,bitsandbytes.__version__)"; } > $OUT/env.txt 2>&1
cat $OUT/env.txt
T0=$(date +%s)
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_scaling.py -m gpu > $OUT/fsdp-tests.txt 2>&1
tail -8 $OUT/fsdp-tests.txt
i=0; for f in $(find /tmp/pytest-of-* -path '*fsdp*' -name train.log 2>/dev/null); do i=$((i+1)); cp $f $OUT/fsdp-train-$i.log; done
echo "fsdp done after $(( $(date +%s) - T0 )) s"
timeout 250 python3 -m finetune bench-objectives --student llama-3.2-1b --teacher llama-3-8b --mode qlora --seq 1024 \
  --batch 4 --steps 6 --warmup 2 --models-dir /root/bm --out $OUT/objectives.json > $OUT/objectives-log.txt 2>&1
tail -15 $OUT/objectives-log.txt
echo "objectives done after $(( $(date +%s) - T0 )) s"
cat > /tmp/plan1b.json <<'J'
[{"shape": "llama-3.2-1b", "mode": "qlora", "seq": 2048, "batch": 2, "steps": 20, "warmup": 2,
  "arms": ["studio", "unsloth", "studio:-stack-lean_dequant"]}]
J
REM=$(( 560 - ($(date +%s) - T0) ))
if [ $REM -gt 90 ]; then
  timeout $REM python3 -m finetune bench --plan /tmp/plan1b.json --devices 0 --models-dir /root/bm --raw $OUT/ab \
    --budget-s $(( REM - 30 )) --hard-s $(( REM - 10 )) --timeout-s 300 > $OUT/ab-log.txt 2>&1
  tail -12 $OUT/ab-log.txt; cat $OUT/ab/tables.md 2>/dev/null | tail -12
fi
echo "all done after $(( $(date +%s) - T0 )) s"
