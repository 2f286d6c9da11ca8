#!/usr/bin/env bash
# Run sweeps on a GPU node that has no network access: install DeepSpeed and its pure-Python
# dependencies from wheels built beforehand into .whl/, show the card, then run each sweep file
# given. Results go to $OUT/NAME.jsonl, seeded from reports/NAME/results.jsonl when that exists, so
# a sweep cut off by a job's time limit (CALL_BUDGET_S seconds) resumes in the next job. Point logs
# are packed into one archive. Reports are rendered anywhere afterwards:
#   zeroplan report reports/NAME/results.jsonl --out reports/NAME
# Usage: bash benchmarks/device_run.sh benchmarks/h100_check.toml [more.toml ...]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
# NVLink multicast off: on a shared node other jobs may hold the multicast resources.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${CALL_BUDGET_S:-520} ))
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/device.txt"
for sweep in "$@"; do
  name=$(basename "$sweep" .toml)
  left=$(( deadline - $(date +%s) ))
  [ "$left" -gt 30 ] || { echo "no time left for $name"; continue; }
  [ -f "reports/$name/results.jsonl" ] && cp "reports/$name/results.jsonl" "$OUT/$name.jsonl"
  timeout -s INT "$left" python3 -m zeroplan bench --sweep "$sweep" --results "$OUT/$name.jsonl" 2>&1 \
    | grep -v "━" | tail -n 40
done
tar czf "$OUT/logs.tgz" -C "$OUT" points 2>/dev/null && rm -rf "$OUT/points"
ls "$OUT"
