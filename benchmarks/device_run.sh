#!/usr/bin/env bash
# What one call of the lent GPU runs (see README, "Measuring on a GPU"): install the carried
# DeepSpeed wheels, show the card, then run each sweep file given and render its report, all
# under $OUT. Usage: bash benchmarks/device_run.sh benchmarks/h100_check.toml [more.toml ...]
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
# Keep NVLink multicast off (the lending machines' rule).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$OUT/device.txt"
for sweep in "$@"; do
  name=$(basename "$sweep" .toml)
  python3 -m zeroplan bench --sweep "$sweep" --results "$OUT/$name.jsonl" ${BENCH_ARGS:-} 2>&1 | tail -n 60
  python3 -m zeroplan report "$OUT/$name.jsonl" --out "$OUT/$name" 2>&1 | tail -n 3
done
ls -R "$OUT" | head -40
