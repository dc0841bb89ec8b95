#!/bin/bash
# Device call 11d (1 x H200): the gpu-marked fast-path tests after the segments cache kept a graph's static copy
# of the positions beside the batch's own (no second count of one batch).
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
date -u
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_speed.py -m gpu > $OUT/gpu-tests.txt 2>&1
grep -E "^E |passed|failed|PASS|FAIL" $OUT/gpu-tests.txt | head -40
