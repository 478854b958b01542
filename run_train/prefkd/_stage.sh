# Sourced by run_train/prefkd/*.sh. launch_stage EXPERIMENT [NODE=VAR ...] -- [hydra overrides ...]
# Each NODE=VAR whose environment variable VAR is set becomes an override, then run_train/launch.sh runs the
# experiment with the remaining arguments:
#   student=VAR / teacher=VAR   a previous stage's checkpoint: NODE.adapter=DIR for a LoRA adapter
#                               (adapter_config.json; merged into NODE.path, the base), else NODE.path=DIR
#   data=VAR                    dataset.source.train=FILE (the weights of stage 5)

# checkpoint_override NODE DIR: NODE.adapter=DIR for a LoRA checkpoint (adapter_config.json), else NODE.path=DIR.
checkpoint_override() {
  if [ -f "$2/adapter_config.json" ]; then echo "$1.adapter=$2"; else echo "$1.path=$2"; fi
}

launch_stage() {
  local experiment=$1 node var value
  shift
  local args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do
    node=${1%%=*} var=${1#*=}
    shift
    value=${!var:-}
    if [ -z "$value" ]; then continue
    elif [ "$node" = data ]; then args+=("dataset.source.train=$value")
    else args+=("$(checkpoint_override "$node" "$value")"); fi
  done
  [ $# -gt 0 ] && shift
  exec bash "$(dirname "${BASH_SOURCE[0]}")/../launch.sh" "$experiment" "${args[@]}" "$@"
}
