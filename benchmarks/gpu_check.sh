#!/usr/bin/env bash
# The GPU check kit (benchmarks/gpu_check.py): on one CUDA GPU, a pack against its runs alone in
# fp32, bf16 and fp16, fp16 loss scaling with one run overflowing, and the pack's speed against
# the same runs one by one (a RoBERTa-large-shaped encoder, 22 and 66 runs; a TinyLlama-shaped
# decoder), in under 8 minutes, from this checkout alone: no network, no hub, no data folder.
# Prints one table and writes it to ${OUT:-runs/gpu_check}/gpu_check.json (and gpu_check.txt).
#
#   bash benchmarks/gpu_check.sh            # on the GPU
#   bash benchmarks/gpu_check.sh --tiny     # tiny models on the CPU, well under a minute
#
# Python: $PY if set, else .venv/bin/python if there is one, else python3; lorainit is imported
# from src/, so nothing needs installing beyond torch, transformers, peft and tokenizers.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false
export OUT="${OUT:-runs/gpu_check}"
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
