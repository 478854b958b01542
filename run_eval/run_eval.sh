#!/usr/bin/env bash
# Evaluate a full checkpoint on the instruction sets (SPEC §9): Dolly, SelfInst, Vicuna, S-NI, seeds 10..50.
#
#   run_eval/run_eval.sh CKPT_PATH EVAL_BATCH_SIZE [hydra overrides ...]
#   e.g. run_eval/run_eval.sh outputs/demo/checkpoints/best 16 eval.limit=100 'eval.seeds=[10,20]'
#
# CKPT_PATH: a local model directory, a hub id, a .gguf file or package:<pkg>/<file>.gguf.
# Results go to OUTPUT_DIR (default outputs/eval/<CKPT_PATH with / and : as _>); running the same command
# again resumes there. PYTHON defaults to the repository's .venv/bin/python when it exists.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CKPT_PATH EVAL_BATCH_SIZE [hydra overrides ...]" >&2
  exit 2
fi
CKPT=$1
EVAL_BATCH_SIZE=$2
shift 2
source "$(dirname "${BASH_SOURCE[0]}")/../run_train/_python.sh"
need_int EVAL_BATCH_SIZE 1
OUTPUT_DIR=${OUTPUT_DIR:-outputs/eval/$(printf '%s' "${CKPT#/}" | tr '/:' '__')}
exec "$PYTHON" -m prefkd.evaluate eval=instruct "model.path='$CKPT'" "eval.batch_size=$EVAL_BATCH_SIZE" \
  "output_dir='$OUTPUT_DIR'" "$@"
