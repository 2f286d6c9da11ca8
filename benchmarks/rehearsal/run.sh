#!/usr/bin/env bash
# Rehearsal sweeps on a GPU node without network access: DeepSpeed and its pure-Python needs from
# wheels in .whl/, one rehearsed point first (stop at once if rehearsal does not work on this
# node), then the sweeps through benchmarks/device_run.sh (resumable, JSONL under $OUT).
# Usage: bash benchmarks/rehearsal/run.sh benchmarks/rehearsal/small.toml [more.toml ...]
set -u
started=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# DeepSpeed 0.19.8's op builder parses torch's arch entry "9.0a" with int(); its CPU Adam (offload)
# is built just in time, so the arch list is given plainly.
export TORCH_CUDA_ARCH_LIST="9.0" PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
[ -d .internvl ] || echo "note: .internvl/ is missing (benchmarks/rehearsal/stock_configs.sh): stock-config points will fail"
smoke=$(mktemp -d)
timeout 180 python3 -m zeroplan.runner.launch "$smoke" model=1b stage=3 micro_batch=1 seq_len=4096 tiles=7 \
  steps=2 warmup_steps=1 fixed_tiles=true simulate_world=8 simulate_rank=7 > "$OUT/smoke.json" 2>&1
if ! grep -q '"status": "ok"' "$OUT/smoke.json"; then
  echo "rehearsal smoke point failed:"; tail -c 3000 "$OUT/smoke.json"; tail -n 60 "$smoke/run.log"; exit 1
fi
python3 - "$OUT/smoke.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("smoke ok:", r["device"], "allocated", r["measured_peak_allocated_bytes"], "reserved",
      r["measured_peak_reserved_bytes"], "predicted", r["predicted_peak_allocated_bytes"],
      r["predicted_peak_reserved_bytes"], "nvml process", r.get("nvml_process_peak_used_bytes"),
      "outside allocator", r.get("outside_allocator_bytes"), "states", r.get("model_states"))
PY
# The whole call's budget (CALL_BUDGET_S, default 560 s), less what the set-up and smoke point took.
CALL_BUDGET_S=$(( ${CALL_BUDGET_S:-560} - ($(date +%s) - started) )) bash benchmarks/device_run.sh "$@"
