#!/usr/bin/env bash
# SFT of the gptxl pair's teacher on Dolly: config/experiment/gptxl_teacher_sft.yaml. TEACHER_PATH is the base
# model fine-tuned here (default Qwen/Qwen2.5-7B-Instruct); pass the result to the KD scripts as TEACHER_PATH.
#   [NUM_GPUS=N] [TEACHER_PATH=...] [DOLLY_PATH=...] bash run_train/gptxl/teacher_sft.sh [hydra overrides ...]
set -euo pipefail
STUDENT_PATH=${TEACHER_PATH:-} NO_TEACHER=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" gptxl_teacher_sft "$@"
