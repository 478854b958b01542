#!/usr/bin/env bash
# SFT of the student (no teacher), Qwen1.5-1.8B -> GPT2-120M: config/experiment/gpt2_sft.yaml (the published numbers, each with its source).
#   [NUM_GPUS=N] [TEACHER_PATH=...] [STUDENT_PATH=...] [DOLLY_PATH=...] bash $0 [hydra overrides ...]
set -euo pipefail
NO_TEACHER=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" gpt2_sft "$@"
