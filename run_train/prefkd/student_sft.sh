#!/usr/bin/env bash
# PrefKD stage 4 (docs/methods.md §10): full SFT of the student on the chosen responses (config/experiment/prefkd_student_sft.yaml).
#   [NUM_GPUS=N] [STUDENT_PATH=base, default Qwen/Qwen2.5-1.5B] [HH_PATH=pairs.jsonl] bash $0 [hydra overrides ...]
# Its checkpoints/best is STUDENT_SFT of stages 5 and 6 and of the baselines (dpo.sh, ipo.sh, tisdpo.sh).
set -euo pipefail
NO_TEACHER=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" prefkd_student_sft "$@"
