#!/usr/bin/env bash
# PrefKD baseline (docs/methods.md §10): TIS-DPO of the SFT student, no teacher (config/experiment/prefkd_tisdpo.yaml).
#   WEIGHTS=per-token weights.jsonl STUDENT_SFT=stage-4 ckpt [NUM_GPUS=N] bash $0 [hydra overrides ...]
# WEIGHTS: weights.sh weights.per_token=true with contrastive models of the student's own tokenizer.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_stage.sh"
export NO_TEACHER=1
launch_stage prefkd_tisdpo data=WEIGHTS student=STUDENT_SFT -- "$@"
