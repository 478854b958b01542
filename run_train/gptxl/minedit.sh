#!/usr/bin/env bash
# MinED, Qwen2.5-7B-Instruct -> GPT2-1.5B (LoRA): config/experiment/gptxl_minedit.yaml (the published numbers, each with its source).
#   [NUM_GPUS=N] [TEACHER_PATH=...] [STUDENT_PATH=...] [DOLLY_PATH=...] bash $0 [hydra overrides ...]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" gptxl_minedit "$@"
