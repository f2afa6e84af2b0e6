#!/usr/bin/env bash
# What prefix caching buys in time, measured on a GPU, in one command.
#
#   bench/gpu_throughput.sh [MODEL] [OUT_DIR] [extra options of bench/gpu_throughput.py]
#
# MODEL: a catalog name (default llama-3.1-8b; built as its real architecture with random
# weights, no download) or a local model folder. OUT_DIR: default gpu-throughput-out.
# Runs the pipeline on a high- and a low-overlap sample log with --model MODEL and this GPU,
# then `pc-advise replay --measure-time` (caching on / off / sharing removed / breakers fixed);
# prints a table and writes OUT_DIR/gpu_throughput.json. Needs vLLM's CUDA build in the
# active Python environment (pip install -e '.[vllm]').
#
# Without a GPU it refuses with exit code 2 before doing anything.
set -euo pipefail

refuse() {
  echo "gpu_throughput: $1. This benchmark times a real GPU; run it on a machine with an NVIDIA GPU," \
       "or use 'pc-advise replay RUN --measure-time' to check the mechanism on a CPU." >&2
  exit 2
}

command -v nvidia-smi >/dev/null 2>&1 || refuse "no nvidia-smi on PATH (no NVIDIA driver here)"
nvidia-smi -L >/dev/null 2>&1 || refuse "nvidia-smi finds no GPU"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
model="${1:-llama-3.1-8b}"
out="${2:-gpu-throughput-out}"
shift $(( $# < 2 ? $# : 2 ))

PYTHON="${PYTHON:-python}"
command -v "$PYTHON" >/dev/null 2>&1 || refuse "no '$PYTHON' on PATH (activate the environment with vLLM, or set PYTHON)"

export HF_HUB_OFFLINE=1
exec "$PYTHON" "$here/gpu_throughput.py" --model "$model" --out "$out" "$@"
