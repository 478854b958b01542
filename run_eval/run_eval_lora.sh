#!/usr/bin/env bash
# Evaluate a LoRA adapter on the instruction sets (SPEC §9): the adapter is applied to its base, not merged.
#
#   run_eval/run_eval_lora.sh LORA_ADAPTER_PATH EVAL_BATCH_SIZE [hydra overrides ...]
#
# The base model is the adapter's adapter_config.json base_model_name_or_path unless BASE_MODEL is set.
# Results go to OUTPUT_DIR (default outputs/eval/<adapter path with / and : as _>); rerunning resumes.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 LORA_ADAPTER_PATH EVAL_BATCH_SIZE [hydra overrides ...]" >&2
  exit 2
fi
ADAPTER=$1
EVAL_BATCH_SIZE=$2
shift 2
source "$(dirname "${BASH_SOURCE[0]}")/../run_train/_python.sh"
need_int EVAL_BATCH_SIZE 1
if [ ! -f "$ADAPTER/adapter_config.json" ]; then
  echo "$0: $ADAPTER/adapter_config.json not found: LORA_ADAPTER_PATH must be a peft adapter directory" >&2
  exit 2
fi
if [ -z "${BASE_MODEL:-}" ]; then
  BASE_MODEL=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["base_model_name_or_path"] or "")' \
    "$ADAPTER/adapter_config.json")
  if [ -z "$BASE_MODEL" ]; then
    echo "$0: $ADAPTER/adapter_config.json names no base_model_name_or_path: set BASE_MODEL" >&2
    exit 2
  fi
fi
OUTPUT_DIR=${OUTPUT_DIR:-outputs/eval/$(printf '%s' "${ADAPTER#/}" | tr '/:' '__')}
echo "base model: $BASE_MODEL" >&2
exec "$PYTHON" -m prefkd.evaluate eval=instruct "model.path='$BASE_MODEL'" "model.adapter='$ADAPTER'" \
  "eval.batch_size=$EVAL_BATCH_SIZE" "output_dir='$OUTPUT_DIR'" "$@"
