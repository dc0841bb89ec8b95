#!/bin/bash
# Device call E (1 x H200): the gpu-marked tests after the fast path (fast checkpoint under DDP) and FSDP loading changed.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $OUT/env.txt
T0=$(date +%s)
timeout 380 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_speed.py tests/test_scaling.py > $OUT/gpu-tests.txt 2>&1
tail -15 $OUT/gpu-tests.txt; echo "done after $(( $(date +%s) - T0 )) s"
