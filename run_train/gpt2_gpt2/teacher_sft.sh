#!/usr/bin/env bash
# SFT of the gpt2_gpt2 pair's teacher on Dolly: config/experiment/gpt2_gpt2_teacher_sft.yaml. TEACHER_PATH is the base
# model fine-tuned here (default openai-community/gpt2-xl); pass the result to the KD scripts as TEACHER_PATH.
#   [NUM_GPUS=N] [TEACHER_PATH=...] [DOLLY_PATH=...] bash run_train/gpt2_gpt2/teacher_sft.sh [hydra overrides ...]
set -euo pipefail
STUDENT_PATH=${TEACHER_PATH:-} NO_TEACHER=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" gpt2_gpt2_teacher_sft "$@"
