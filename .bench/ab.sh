set -x
export PYTHONUNBUFFERED=1 MAMBATRAIN_AUTOTUNE=0
python3 -m pip install -q --no-deps --no-build-isolation -e . >$OUT/pip.log 2>&1
for c in 256 128 64; do
  python3 scripts/bench_scan.py --quick --no-peers --skip selective --lengths 16384 1048576 --ssd-chunk $c --out $OUT/new > $OUT/new_$c.log 2>&1
done
mkdir -p /tmp/keep && cp kernels/ssd/triton_bwd.py kernels/ssd/triton.py /tmp/keep/
cp .bench/old/*.py kernels/ssd/
python3 scripts/bench_scan.py --quick --no-peers --skip selective check --lengths 16384 1048576 --ssd-chunk 256 --out $OUT/old > $OUT/old_256.log 2>&1
cp /tmp/keep/*.py kernels/ssd/
timeout 250 python3 -m pytest -q tests/kernels/test_ssd.py > $OUT/pytest.log 2>&1
grep -h "ours_fwdbwd_ms\|ssd check" $OUT/*.log | cut -c1-400; tail -3 $OUT/pytest.log
