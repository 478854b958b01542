#!/usr/bin/env bash
# PrefKD baseline (docs/methods.md §10): dpo of the SFT student, no teacher (config/experiment/prefkd_dpo.yaml).
#   STUDENT_SFT=stage-4 ckpt [NUM_GPUS=N] [HH_PATH=pairs.jsonl] bash $0 [hydra overrides ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_stage.sh"
export NO_TEACHER=1
launch_stage prefkd_dpo student=STUDENT_SFT -- "$@"
