#!/usr/bin/env bash
# DSKD-CMA, Mistral-7B -> TinyLLaMA-1.1B (LoRA): config/experiment/tinyllama_dskd_cma.yaml (the published numbers, each with its source).
#   [NUM_GPUS=N] [TEACHER_PATH=...] [STUDENT_PATH=...] [DOLLY_PATH=...] bash $0 [hydra overrides ...]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" tinyllama_dskd_cma "$@"
