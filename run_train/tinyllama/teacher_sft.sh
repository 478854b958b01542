#!/usr/bin/env bash
# SFT of the tinyllama pair's teacher on Dolly: config/experiment/tinyllama_teacher_sft.yaml. TEACHER_PATH is the base
# model fine-tuned here (default mistralai/Mistral-7B-v0.1); pass the result to the KD scripts as TEACHER_PATH.
#   [NUM_GPUS=N] [TEACHER_PATH=...] [DOLLY_PATH=...] bash run_train/tinyllama/teacher_sft.sh [hydra overrides ...]
set -euo pipefail
STUDENT_PATH=${TEACHER_PATH:-} NO_TEACHER=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" tinyllama_teacher_sft "$@"
