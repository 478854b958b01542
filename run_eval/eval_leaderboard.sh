#!/usr/bin/env bash
# The Open LLM Leaderboard (v2) task group through lm-eval (`pip install -e '.[eval]'`).
#
#   run_eval/eval_leaderboard.sh MODEL_PATH [lm-eval options ...]
#   e.g. run_eval/eval_leaderboard.sh outputs/run/checkpoints/best --apply_chat_template --fewshot_as_multiturn
#
# Backend: vllm when importable, else hf (BACKEND=hf|vllm forces one). ADAPTER=DIR evaluates a peft adapter
# on MODEL_PATH (hf backend). Options after MODEL_PATH go to lm-eval after the defaults, so they win:
# --tasks replaces the leaderboard group (with --include_path DIR for custom task YAMLs), --model_args adds
# or overrides keys, --batch_size / --output_path / --limit / --device override.
# Defaults: --batch_size ${EVAL_BATCH_SIZE:-auto}, --output_path ${OUTPUT_DIR:-outputs/leaderboard/<name>}.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 MODEL_PATH [lm-eval options ...]" >&2
  exit 2
fi
MODEL=$1
shift
source "$(dirname "${BASH_SOURCE[0]}")/../run_train/_python.sh"
if ! "$PYTHON" -c 'import lm_eval' 2>/dev/null; then
  echo "$0: lm-eval is not installed: pip install -e '.[eval]'" >&2
  exit 2
fi
if [ -z "${BACKEND:-}" ]; then
  if [ -z "${ADAPTER:-}" ] && "$PYTHON" -c 'import vllm' 2>/dev/null; then BACKEND=vllm; else BACKEND=hf; fi
fi
MODEL_ARGS="pretrained=$MODEL,dtype=${DTYPE:-auto}"
if [ "$BACKEND" = vllm ]; then
  MODEL_ARGS="$MODEL_ARGS,gpu_memory_utilization=${GPU_MEMORY_UTILIZATION:-0.8}"
elif [ -n "${ADAPTER:-}" ]; then
  MODEL_ARGS="$MODEL_ARGS,peft=$ADAPTER"
fi
TASKS=(--tasks leaderboard)
for arg in "$@"; do
  case "$arg" in --tasks|--tasks=*|-t) TASKS=() ;; esac
done
OUTPUT_DIR=${OUTPUT_DIR:-outputs/leaderboard/$(printf '%s' "${MODEL#/}" | tr '/:' '__')}
exec "$PYTHON" -m lm_eval run --model "$BACKEND" --model_args "$MODEL_ARGS" "${TASKS[@]}" \
  --batch_size "${EVAL_BATCH_SIZE:-auto}" --output_path "$OUTPUT_DIR" "$@"
