#!/usr/bin/env bash
# Profile one step of 4B ZeRO-3 plain and with packed varlen rows (why packing slows it: 1.99 s
# against 1.72 s a step in reports/h100_z3_steady). Run on the GPU after benchmarks/device_run.sh
# (which installs the carried wheels into /tmp/site); writes $OUT/h100_z3_4b_{plain,packed}.{jsonl,txt}.
set -u
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for v in plain packed; do
  ZEROPLAN_PROFILE=$OUT/h100_z3_4b_$v.txt timeout -s INT 200 python3 -m zeroplan bench \
    --sweep benchmarks/profile/h100_z3_4b_$v.toml --results "$OUT/h100_z3_4b_$v.jsonl" 2>&1 | grep -v "━" | tail -n 3
done
