#!/usr/bin/env bash
# PrefKD stage 6 (docs/methods.md §10): the student trained with kd_tisdpo, the DPO teacher π⁺ as reference
# (config/experiment/prefkd_kd_tisdpo.yaml).
#   WEIGHTS=stage-5 weights.jsonl STUDENT_SFT=stage-4 ckpt TEACHER_DPO=stage-2 ckpt [TEACHER_PATH=base] [NUM_GPUS=N] \
#   bash $0 [hydra overrides ...]
# TEACHER_DPO: a LoRA adapter (merged into TEACHER_PATH, default mistralai/Mistral-7B-v0.3) or a full checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_stage.sh"
launch_stage prefkd_kd_tisdpo data=WEIGHTS student=STUDENT_SFT teacher=TEACHER_DPO -- "$@"
