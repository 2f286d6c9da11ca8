#!/usr/bin/env bash
# Record the CUDA caching allocator's trace of the runs zeroplan's reserved-memory replay misses
# most (arguments: which of z0 z2 z3; default z2 z3). Run on the GPU after benchmarks/device_run.sh (which installs the carried wheels into
# /tmp/site); writes $OUT/h100_memhist_{z2,z3}.{jsonl,events.json.gz}. Compare offline with
#   .venv/bin/python benchmarks/memory_history.py reports/h100_memhist
set -u
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for v in ${@:-z2 z3}; do
  ZEROPLAN_MEMORY_HISTORY=$OUT/h100_memhist_$v.events.json.gz ZEROPLAN_MEMORY_HISTORY_STACKS=${STACKS:-} timeout -s INT 240 python3 -m zeroplan bench \
    --sweep benchmarks/profile/h100_memhist_$v.toml --results "$OUT/h100_memhist_$v.jsonl" 2>&1 | grep -v "━" | tail -n 3
done
ls -la $OUT
