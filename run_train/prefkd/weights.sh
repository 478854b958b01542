#!/usr/bin/env bash
# PrefKD stage 5 (docs/methods.md §10): per-parent weights w_p from π⁺ and π⁻ (`python -m prefkd.weights`, config/weights.yaml).
#   POSITIVE=stage-2 ckpt NEGATIVE=stage-3 ckpt [POLICY=student tokenizer] [TEACHER_PATH=base] [HH_PATH=pairs.jsonl] \
#   [OUTPUT=weights.jsonl] bash $0 [hydra overrides ...]
# POSITIVE/NEGATIVE: LoRA adapters (applied to TEACHER_PATH, default mistralai/Mistral-7B-v0.3) or full checkpoints.
# POLICY (default Qwen/Qwen2.5-1.5B; STUDENT_SFT works too) is the student whose tokenizer, with the teachers', defines
# the parents. The output (default outputs/prefkd-weights/weights.jsonl) is WEIGHTS of stage 6; rerunning resumes.
set -euo pipefail
HERE=$(dirname "${BASH_SOURCE[0]}")
source "$HERE/../_python.sh"
source "$HERE/_stage.sh"
: "${POSITIVE:?set POSITIVE to the positive teacher (run_train/prefkd/teacher_dpo.sh's checkpoints/best)}"
: "${NEGATIVE:?set NEGATIVE to the negative teacher (run_train/prefkd/teacher_rdpo.sh's checkpoints/best)}"
BASE=${TEACHER_PATH:-mistralai/Mistral-7B-v0.3}
# a LoRA adapter is applied to the base (not merged); a full checkpoint replaces it
ARGS=("positive.path=$BASE" "negative.path=$BASE" "policy.path=${POLICY:-Qwen/Qwen2.5-1.5B}"
      "output=${OUTPUT:-outputs/prefkd-weights/weights.jsonl}"
      "$(checkpoint_override positive "$POSITIVE")" "$(checkpoint_override negative "$NEGATIVE")")
exec "$PYTHON" -m prefkd.weights "${ARGS[@]}" "$@"
