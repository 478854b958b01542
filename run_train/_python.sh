# Sourced by the run_train/ and run_eval/ scripts: ROOT is the repository, PYTHON the interpreter (the repository's
# .venv/bin/python when it exists and PYTHON is not set, else `python`).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
# PREFKD_SHARED (tokenizers/, and data/ after $PREFKD_DATA): the project's shared/ beside the clone when unset.
if [ -z "${PREFKD_SHARED:-}" ] && [ -d "$ROOT/../shared" ]; then
  PREFKD_SHARED=$(cd "$ROOT/../shared" && pwd)
  export PREFKD_SHARED
fi
# outdir "$@": OUT, the scripts' first argument as an absolute folder (created); without one, the usage line and exit 2.
outdir() {
  if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [hydra overrides for every training run ...]" >&2
    exit 2
  fi
  OUT=$(mkdir -p "$1" && cd "$1" && pwd)
}
