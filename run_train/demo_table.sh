#!/usr/bin/env bash
# The MCW-KD paper's table in miniature, on this CPU: config/experiment/demo_table.yaml per method and training
# seed, every best checkpoint evaluated on held-out sets, the teacher and the untrained student as reference rows,
# then `python -m prefkd.report` (OUTDIR/report/report.md, the table of docs/results.md).
#
#   bash run_train/demo_table.sh OUTDIR [hydra overrides for every training run ...]
#
# Resumable: rerun with the same OUTDIR. A finished run (train_summary.json with finished: true) and its evaluations
# (results.json) are kept; an interrupted run resumes from its newest checkpoint and is evaluated again.
#
# Environment (defaults in brackets):
#   METHODS        rows: a loss name, or LABEL:LOSS+override+override (e.g. mcw_kd_onpolicy:mcw_kd+trainer.on_policy.
#                  fraction=0.5+trainer.teacher_cache=null; a row that sets trainer.teacher_cache runs without the
#                  shared cache)                   [sft uld minedit dskd_cma multilevel_ot mcw_kd]
#   SEEDS          training seeds per method       [1 2]
#   NLL_SETS       eval=nll sets                   [dolly,self_inst,vicuna,sinst]
#   NLL_LIMIT      first N examples of each set    [100]
#   ROUGE_SETS     eval=instruct sets              [dolly,vicuna]
#   ROUGE_LIMIT    first N prompts of each set     [100]   (Dolly test's first 100, all 80 of Vicuna)
#   ROUGE_SEEDS    sampling seeds                  [10,20] (a rerun with more seeds samples only the new ones)
#   ROUGE_TOKENS   max_new_tokens                  [64]
#   TEACHER_CACHE  1: train from one teacher cache (OUTDIR/teacher_cache); 0: run the teacher live   [1]
#   PYTHON         interpreter                     [the repository's .venv/bin/python when it exists]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
outdir "$@"
shift
METHODS=${METHODS:-"sft uld minedit dskd_cma multilevel_ot mcw_kd"}
SEEDS=${SEEDS:-"1 2"}
NLL_LIMIT=${NLL_LIMIT:-100}; ROUGE_LIMIT=${ROUGE_LIMIT:-100}; ROUGE_TOKENS=${ROUGE_TOKENS:-64}
ROUGE_SEEDS=${ROUGE_SEEDS:-10,20}; TEACHER_CACHE=${TEACHER_CACHE:-1}
# every setting is checked before the first run: a wrong one stops here, not after an hour of training
need_int NLL_LIMIT 1; need_int ROUGE_LIMIT 1; need_int ROUGE_TOKENS 1; need_choice TEACHER_CACHE 0 1
[[ "$SEEDS" =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)*[[:space:]]*$ ]] || bad_env SEEDS "expects whole numbers \
separated by spaces, e.g. \"1 2\""
[[ "$ROUGE_SEEDS" =~ ^[0-9]+(,[0-9]+)*$ ]] || bad_env ROUGE_SEEDS "expects whole numbers separated by commas, e.g. 10,20"
for row in $METHODS; do
  loss=${row#*:}; loss=${loss%%+*}
  [ -f "$ROOT/config/loss/$loss.yaml" ] || bad_env METHODS "row $row: no loss $loss (config/loss/: $(cd \
"$ROOT/config/loss" && ls | sed 's/\.yaml$//' | tr '\n' ' '))"
done
NLL=(eval=nll "eval.datasets=[${NLL_SETS:-dolly,self_inst,vicuna,sinst}]" "eval.limit=$NLL_LIMIT")
ROUGE=(eval=instruct "eval.datasets=[${ROUGE_SETS:-dolly,vicuna}]" "eval.limit=$ROUGE_LIMIT"
       "eval.seeds=[$ROUGE_SEEDS]" "eval.max_new_tokens=$ROUGE_TOKENS" eval.batch_size=20)
cd "$ROOT"
START=$(date +%s)
COMMAND="bash run_train/demo_table.sh $OUT $*"
echo "$COMMAND" > "$OUT/command.txt"

# done KIND FILE: FILE (a results.json) is there and, for rouge, holds exactly the sampling seeds asked for.
done_() {
  [ -f "$2" ] || return 1
  [ "$1" = nll ] && return 0
  "$PYTHON" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['seeds'] == [int(s) for s in \
sys.argv[2].split(',')] else 1)" "$2" "$ROUGE_SEEDS"
}

# evaluate LABEL DIR MODEL_ARGS...: both protocols into DIR/eval_nll and DIR/eval_rouge, each once (the ROUGE-L
# evaluation again when the sampling seeds changed: prefkd.evaluate reuses the (set, seed) pairs it has).
evaluate() {
  local label=$1 dir=$2
  shift 2
  local kind protocol
  for kind in nll rouge; do
    done_ $kind "$dir/eval_$kind/results.json" && continue
    if [ $kind = nll ]; then protocol=("${NLL[@]}"); else protocol=("${ROUGE[@]}"); fi
    echo "== $label: eval_$kind"
    "$PYTHON" -m prefkd.evaluate "$@" "${protocol[@]}" logger=none progress=false output_dir="$dir/eval_$kind"
  done
}

# The reference rows: the teacher, and the student as it starts (the same transplant the runs start from).
TEACHER=$("$PYTHON" -m prefkd.train experiment=demo_table "$@" --cfg job --resolve --package teacher | sed -n 's/^path: //p')
evaluate teacher "$OUT/reference/teacher" model.path="$TEACHER"
INIT="$OUT/reference/student_init"
if [ ! -f "$INIT/model/config.json" ]; then  # instantiate the runs' student config once and save it
  "$PYTHON" - "$INIT/model" experiment=demo_table "$@" <<'PY'
import sys
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from prefkd.utils.config import config_dir
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    student = instantiate(compose("train", overrides=sys.argv[2:]).student)
student.model.save_pretrained(sys.argv[1] + ".tmp")
student.tokenizer.save_pretrained(sys.argv[1] + ".tmp")
PY
  mv "$INIT/model.tmp" "$INIT/model"
fi
evaluate student_init "$INIT" model.path="$INIT/model"

# The teacher's last hidden states over the 900/100 records, once: every run reads its teacher outputs from them
# (exact, prefkd.training.teacher_cache) instead of running the 30-layer teacher again. sft needs no teacher.
CACHE="$OUT/teacher_cache"
USE_CACHE=$TEACHER_CACHE
[ -z "$(echo "$METHODS" | tr ' ' '\n' | grep -vx sft)" ] && USE_CACHE=0  # sft alone never runs the teacher
if [ "$USE_CACHE" = 1 ] && [ ! -f "$CACHE/manifest.json" ]; then
  echo "== teacher cache (last hidden states)"
  "$PYTHON" -m prefkd.teacher_cache experiment=demo_table "$@" cache.dir="$CACHE" cache.store=hidden \
    cache.progress=false
fi
CACHED=()
[ "$USE_CACHE" = 1 ] && CACHED=(trainer.teacher_cache="$CACHE")

for row in $METHODS; do
  method=${row%%:*}  # the row's label (the loss name when the row is only that)
  IFS=+ read -ra spec <<< "${row#*:}"
  loss=${spec[0]}
  extra=("${spec[@]:1}")
  cached=("${CACHED[@]}")
  [[ " ${extra[*]} " == *" trainer.teacher_cache="* ]] && cached=()
  for seed in $SEEDS; do
    run="$OUT/runs/$method/seed$seed"
    if ! "$PYTHON" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['finished'] else 1)" \
        "$run/train_summary.json" 2>/dev/null; then  # not run, or stopped early (pre-emption): train / resume
      echo "== $method seed $seed: training"
      rm -rf "$run/eval_nll" "$run/eval_rouge"  # evaluations of an unfinished run's checkpoint are stale
      "$PYTHON" -m prefkd.train experiment=demo_table loss="$loss" method="$method" trainer.seed="$seed" \
        hydra.run.dir="$run" "${cached[@]}" "${extra[@]}" "$@"
    fi
    best=$("$PYTHON" -c "import json,sys; c=json.load(open(sys.argv[1]))['checkpoints']; print(c.get('best') or c['last'])" \
      "$run/train_summary.json")
    evaluate "$method seed $seed" "$run" model.path="$best"
  done
done

WALL=$(( $(date +%s) - START ))
echo "$WALL" > "$OUT/wall_time_s.txt"
"$PYTHON" -m prefkd.report "$OUT" --out "$OUT/report" --title "prefkd: the MCW-KD table in miniature (CPU)" \
  --note "Command: \`$COMMAND\`" \
  --note "Wall time of this invocation: ${WALL} s on $(nproc) CPU cores (a resumed invocation counts only its own time)."
echo "table: $OUT/report/report.md"
