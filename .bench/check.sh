#!/usr/bin/env bash
# background GPU job: SSD correctness at chunks 256/128/64 with autotune on, then the GPU kernel tests
set -x
cd /tmp/w
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/w/.triton
python3 -m pip install -q --no-deps --no-build-isolation -e . > $RES/pip.log 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > $RES/gpu.txt
for c in 256 128 64; do
  python3 scripts/bench_scan.py --quick --no-peers --skip selective --lengths 16384 65536 --ssd-chunk $c --out $RES > $RES/scan_$c.log 2>&1
done
MAMBATRAIN_AUTOTUNE=0 python3 -m pytest -q -x tests/kernels/test_ssd.py > $RES/pytest_ssd.log 2>&1
echo done > $RES/DONE
