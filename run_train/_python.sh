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
# Checks of the scripts' environment variables, before anything runs: each stops the script (exit 2) with the
# variable, its value and what it accepts.
#   need_int NAME MIN [MAX]    $NAME is a whole number ≥ MIN (and ≤ MAX)
#   need_number NAME           $NAME is a number (1e-3, 0.5, 2)
#   need_choice NAME A B ...   $NAME is one of A B ...
#   need_file NAME WHAT        $NAME is an existing file (WHAT says which)
bad_env() {
  echo "$1=${!1}: $2" >&2
  exit 2
}
need_int() {
  local value=${!1}
  [[ "$value" =~ ^[0-9]+$ ]] || bad_env "$1" "expects a whole number ≥ $2${3:+ and ≤ $3}"
  (( 10#$value >= $2 )) || bad_env "$1" "expects a whole number ≥ $2${3:+ and ≤ $3}"
  [ -z "${3:-}" ] || (( 10#$value <= $3 )) || bad_env "$1" "expects a whole number ≥ $2 and ≤ $3"
}
need_number() {
  [[ "${!1}" =~ ^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$ ]] || bad_env "$1" "expects a number (e.g. 1e-3)"
}
need_choice() {
  local name=$1 choice
  shift
  for choice in "$@"; do [ "${!name}" = "$choice" ] && return 0; done
  bad_env "$name" "expects one of: $*"
}
need_file() {
  [ -f "${!1}" ] || bad_env "$1" "no such file (expected $2)"
}
