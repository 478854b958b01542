#!/usr/bin/env bash
# SFT of the student (no teacher), Mistral-7B -> TinyLLaMA-1.1B (LoRA): config/experiment/tinyllama_sft.yaml (the published numbers, each with its source).
#   [NUM_GPUS=N] [TEACHER_PATH=...] [STUDENT_PATH=...] [DOLLY_PATH=...] bash $0 [hydra overrides ...]
set -euo pipefail
NO_TEACHER=1 exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" tinyllama_sft "$@"
