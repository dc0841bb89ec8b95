#!/bin/bash
# Device call 12e (1 x H200): the gpu-marked fast-path tests after the NF4 kernel's arguments were bound per weight.
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
date -u
timeout 110 python3 -m pytest -q -rs -p no:cacheprovider tests/test_speed.py -m gpu > $OUT/gpu-tests.txt 2>&1
grep -E "^E |passed|failed|PASS|FAIL" $OUT/gpu-tests.txt | head -20
