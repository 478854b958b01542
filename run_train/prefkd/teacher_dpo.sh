#!/usr/bin/env bash
# PrefKD stage 2 (docs/methods.md §10): the positive teacher π⁺, DPO of the SFT teacher (config/experiment/prefkd_teacher_dpo.yaml).
#   TEACHER_SFT=stage-1 checkpoint [TEACHER_PATH=base] [NUM_GPUS=N] [HH_PATH=pairs.jsonl] bash $0 [hydra overrides ...]
# TEACHER_SFT: a LoRA adapter (merged into TEACHER_PATH, default mistralai/Mistral-7B-v0.3) or a full checkpoint.
# Its checkpoints/best is TEACHER_DPO of stage 6 and POSITIVE of stage 5.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_stage.sh"
export STUDENT_PATH=${TEACHER_PATH:-} NO_TEACHER=1
launch_stage prefkd_teacher_dpo student=TEACHER_SFT -- "$@"
