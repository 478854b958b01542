#!/usr/bin/env bash
# The launcher behind run_train/<pair>/<method>.sh: `python -m prefkd.train experiment=EXPERIMENT [overrides]`.
#
#   run_train/launch.sh EXPERIMENT [hydra overrides ...]
#
# Environment:
#   NUM_GPUS      > 1: `accelerate launch --num_processes NUM_GPUS` (plus ACCELERATE_CONFIG=file, optional)
#   TEACHER_PATH  the teacher (e.g. your SFT checkpoint); default: the preset's hub id. Ignored with NO_TEACHER=1
#   STUDENT_PATH  the student's initial weights; default: the preset's hub id
#   DOLLY_PATH    a local folder of Dolly JSONL files (offline); default: the hub id
#   PYTHON        interpreter; default: the repository's .venv/bin/python when it exists
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 EXPERIMENT [hydra overrides ...]" >&2
  exit 2
fi
EXP=$1
shift
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
NUM_GPUS=${NUM_GPUS:-1}
need_int NUM_GPUS 1
[ -z "${ACCELERATE_CONFIG:-}" ] || need_file ACCELERATE_CONFIG "an accelerate config file, e.g. config/accelerate/ddp.yaml"
ARGS=("experiment=$EXP")
if [ -n "${TEACHER_PATH:-}" ] && [ "${NO_TEACHER:-0}" != 1 ]; then ARGS+=("teacher.path=$TEACHER_PATH"); fi
if [ -n "${STUDENT_PATH:-}" ]; then ARGS+=("student.path=$STUDENT_PATH"); fi
if [ "$NUM_GPUS" -gt 1 ]; then
  CONFIG=(); [ -n "${ACCELERATE_CONFIG:-}" ] && CONFIG=(--config_file "$ACCELERATE_CONFIG")
  exec "$PYTHON" -m accelerate.commands.launch "${CONFIG[@]}" --num_processes "$NUM_GPUS" -m prefkd.train \
    "${ARGS[@]}" "$@"
fi
exec "$PYTHON" -m prefkd.train "${ARGS[@]}" "$@"
