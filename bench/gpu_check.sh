#!/usr/bin/env bash
# The GPU check: run from a copy of the repo on a GPU machine whose image has torch, transformers, accelerate and
# peft (the kit's machine: one H200, Python 3.12). Installs the wheels `make gpu-wheels` put in .whl/ (offline),
# then bench/gpu_check.py: a random ~0.5B Llama-shaped model, sft/reward/dpo/ppo in bf16, one QLoRA sft and one
# ZeRO-2 sft, a few steps each. Results: $OUT/gpu_check.json and $OUT/gpu_check.md (tokens/s, peak GPU memory,
# MFU per stage), plus $OUT/gpu_check.log. About 3 minutes on an H200; the whole run is capped by CHECK_TIMEOUT.
#
#   bash bench/gpu_check.sh                 # on the GPU machine (the device tool: carry .whl)
#   bash bench/gpu_check.sh --cpu-smoke     # here: the same script on a tiny model on CPU, no wheels installed
set -uo pipefail

OUT=${OUT:-$PWD/bench/out/gpu-check}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-230}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [[ "${1:-}" != "--cpu-smoke" ]]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run 'make gpu-wheels' here first and carry .whl" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

timeout "$CHECK_TIMEOUT" "$PYTHON" bench/gpu_check.py run --out "$OUT" "$@"
rc=$?
[[ $rc -eq 124 ]] && echo "gpu check: stopped after ${CHECK_TIMEOUT}s; the stages finished so far are in $OUT" >&2
cat "$OUT/gpu_check.md" 2>/dev/null
exit $rc
