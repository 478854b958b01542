#!/usr/bin/env bash
# PrefKD stage 1 (docs/methods.md §10): LoRA SFT of the teacher on the chosen responses (config/experiment/prefkd_teacher_sft.yaml).
#   [NUM_GPUS=N] [TEACHER_PATH=base, default mistralai/Mistral-7B-v0.3] [HH_PATH=pairs.jsonl] bash $0 [hydra overrides ...]
# Its checkpoints/best (a LoRA adapter) is TEACHER_SFT of stages 2 and 3.
set -euo pipefail
STUDENT_PATH=${TEACHER_PATH:-} NO_TEACHER=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" prefkd_teacher_sft "$@"
