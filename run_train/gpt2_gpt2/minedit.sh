#!/usr/bin/env bash
# MinED, GPT2-1.5B -> GPT2-120M: config/experiment/gpt2_gpt2_minedit.yaml (the published numbers, each with its source).
#   [NUM_GPUS=N] [TEACHER_PATH=...] [STUDENT_PATH=...] [DOLLY_PATH=...] bash $0 [hydra overrides ...]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" gpt2_gpt2_minedit "$@"
