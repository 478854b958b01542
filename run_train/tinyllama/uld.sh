#!/usr/bin/env bash
# ULD, Mistral-7B -> TinyLLaMA-1.1B (LoRA): config/experiment/tinyllama_uld.yaml (the published numbers, each with its source).
#   [NUM_GPUS=N] [TEACHER_PATH=...] [STUDENT_PATH=...] [DOLLY_PATH=...] bash $0 [hydra overrides ...]
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" tinyllama_uld "$@"
