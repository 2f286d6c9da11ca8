#!/usr/bin/env bash
# Copy InternVL's own DeepSpeed configs (internvl_chat/zero_stage*_config*.json) from a checkout of
# OpenGVLab/InternVL into .internvl/ (ignored by git), where the rehearsal sweeps name them.
# Usage: bash benchmarks/rehearsal/stock_configs.sh /path/to/InternVL   (or ZEROPLAN_INTERNVL_REPO)
set -euo pipefail
repo="${1:-${ZEROPLAN_INTERNVL_REPO:-}}"
[ -n "$repo" ] || { echo "usage: $0 /path/to/InternVL (a checkout of OpenGVLab/InternVL)" >&2; exit 2; }
cd "$(dirname "$0")/../.."
mkdir -p .internvl
for f in zero_stage1_config.json zero_stage2_config.json zero_stage3_config.json zero_stage3_config_34b.json \
         zero_stage3_config_100b.json zero_stage3_config_100b_1e7_offload.json; do
  cp "$repo/internvl_chat/$f" ".internvl/$f"
done
ls .internvl
