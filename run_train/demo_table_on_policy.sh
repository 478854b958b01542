#!/usr/bin/env bash
# Issue 16's rows of the miniature table (docs/results.md §3): on-policy MCW-KD, GKD (the generalised JSD, on the
# student's samples) and SeqKD + MCW-KD, with the protocol of run_train/demo_table.sh, into the same OUTDIR, so the
# report holds them beside the off-policy rows.
#
#   bash run_train/demo_table_on_policy.sh OUTDIR [hydra overrides for every training run ...]
#
# 1. SeqKD data: the teacher's sampled answers (`python -m prefkd.generate`) to the first SEQKD_LIMIT [256] of the
#    900 training prompts of the table's split, in OUTDIR/seqkd/train.jsonl (resumable): a run of 32 steps × 8 trains
#    on exactly these 256 answers, once (the teacher answers about 10 prompts a minute here). The 100 dev records, as
#    they are, go to OUTDIR/seqkd/dev.jsonl: checkpoint selection stays on the original answers, as for every row.
# 2. run_train/demo_table.sh with the rows below (resumable likewise). On-policy rows and SeqKD run the teacher live:
#    the teacher cache holds the teacher's states for the dataset's answers only.
#
# Environment: SEEDS, PYTHON and the evaluation variables of demo_table.sh; SEQKD_TOKENS, the teacher's answer
# budget [96 = dataset.max_length - max_prompt_length]; SEQKD_LIMIT, its prompts [256]; ROWS, the rows [all three].
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
outdir "$@"
shift
SEQKD_TOKENS=${SEQKD_TOKENS:-96}; SEQKD_LIMIT=${SEQKD_LIMIT:-256}
need_int SEQKD_TOKENS 1; need_int SEQKD_LIMIT 1
cd "$ROOT"
DATA="$OUT/seqkd"
mkdir -p "$DATA"

if [ ! -f "$DATA/dev.jsonl" ]; then  # the table's own 100 dev records (the carve-out of demo_table.yaml)
  "$PYTHON" - "$DATA/dev.jsonl" experiment=demo_table "$@" <<'PY'
import json, sys
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from prefkd.utils.config import config_dir
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    splits = instantiate(compose("train", overrides=sys.argv[2:]).dataset.source)
with open(sys.argv[1] + ".tmp", "w") as f:
    for r in splits.dev:
        f.write(json.dumps({"prompt": r["prompt"], "output": r["output"]}, ensure_ascii=False) + "\n")
PY
  mv "$DATA/dev.jsonl.tmp" "$DATA/dev.jsonl"
fi

TEACHER=$("$PYTHON" -m prefkd.train experiment=demo_table "$@" --cfg job --resolve --package teacher | sed -n 's/^path: //p')
TRAIN=$("$PYTHON" -m prefkd.train experiment=demo_table "$@" --cfg job --resolve --package dataset.source | sed -n 's/^train: //p')
echo "== SeqKD data: the teacher's answers to the training prompts"
"$PYTHON" -m prefkd.generate model.path="$TEACHER" dataset=jsonl dataset.source.train="$TRAIN" \
  dataset.source.dev_size=100 dataset.source.seed=0 dataset.max_prompt_length=96 split=train \
  sampling.max_new_tokens="$SEQKD_TOKENS" limit="$SEQKD_LIMIT" batch_size=16 seed=0 progress=false \
  out="$DATA/train.jsonl"

LIVE=trainer.teacher_cache=null
ON="trainer.on_policy.max_new_tokens=96+$LIVE"  # samples fill the 192-token budget at most
# kd across the two tokenizers is MinED's (docs/methods.md §6): it scores only the aligned tokens, so on the student's
# samples alone (λ = 1, kd_rate = 1) the student learns to sample text where nothing aligns (docs/results.md §3);
# half the steps on the dataset's answers and kd's CE keep the row meaningful
DEFAULT_ROWS="mcw_kd_onpolicy:mcw_kd+trainer.on_policy.fraction=0.5+$ON \
kd_gjsd_onpolicy:kd+loss.divergence=gjsd+loss.beta=0.5+trainer.on_policy.fraction=0.5+$ON \
seqkd_mcw_kd:mcw_kd+dataset.source.train=$DATA/train.jsonl+dataset.source.dev=$DATA/dev.jsonl+$LIVE"
METHODS="${ROWS:-$DEFAULT_ROWS}" bash run_train/demo_table.sh "$OUT" "$@"
