#!/usr/bin/env bash
# Download into DIR (default .whl/) the Python 3.12 manylinux x86_64 wheels that the GPU check machine lacks, for
# bench/gpu_check.sh to install offline (`make gpu-wheels`). Its image has torch, transformers, accelerate, peft,
# numpy, pandas, pyarrow, huggingface-hub, tokenizers, safetensors, typer, rich, jinja2, matplotlib, filelock,
# pyyaml, requests and tqdm (/work/.library/device/KINDS.md); never carry those: a second torch would be GBs and a
# second transformers would not be the one the machine was measured with.
#
# What it writes (about 13 MiB, within the 64 MiB a device call carries beside the working tree):
#   - align's dependencies the image lacks, pinned to the versions align is tested with here, each --no-deps;
#   - bitsandbytes with only the native libraries for CUDA 13.0/13.2 (the machine's torch is cu130) and the CPU:
#     the full wheel is 43 MB for 17 CUDA/ROCm/XPU builds; the slim one is rewritten with its RECORD to match;
#   - deepspeed built as a pure-Python wheel (DS_BUILD_OPS=0: its CUDA ops are compiled on first use, with the
#     machine's nvcc) against the torch of this venv, with its one missing dependency (hjson).
set -euo pipefail

DIR=${1:-.whl}
PYTHON=${PYTHON:-.venv/bin/python}
BNB_KEEP=${BNB_KEEP:-"cpu cuda130 cuda132"}
mkdir -p "$DIR"

PINNED=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  gguf==0.19.0 vaderSentiment==3.3.2 hjson==3.1.0
)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${PINNED[@]}"

# bitsandbytes, slimmed to the native libraries named in BNB_KEEP.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$scratch" bitsandbytes==0.50.2
rm -f "$DIR"/bitsandbytes-*.whl
"$PYTHON" bench/gpu_check.py slim-wheel "$scratch"/bitsandbytes-*.whl "$DIR" --keep $BNB_KEEP

# deepspeed: no binary wheel on PyPI; a pure-Python one builds in seconds without its ops.
if ! ls "$DIR"/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8 \
    || echo "deepspeed did not build: the kit runs without its ZeRO-2 check" >&2
fi

du -ch "$DIR"/*.whl | tail -1
