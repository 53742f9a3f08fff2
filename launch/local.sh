#!/usr/bin/env bash
# Starts N processes of the trainer on this machine, joined by jax.distributed
# through a coordinator on localhost: the multi-host code path without a cluster.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [--] [trainer flags...]

Starts N processes of `python -m experiments.train` on this machine, joined by
jax.distributed through a coordinator on localhost (process i gets
--coordinator_address=localhost:PORT --num_processes=N --process_id=i).
Waits for all of them; if one fails, the others are stopped and this script
exits with the failed process's status.

Options:
  -n, --num_processes N      processes to start (default 2)
  -d, --cpu_devices K        run on CPU with K devices per process
                             (JAX_PLATFORMS=cpu and
                             XLA_FLAGS=--xla_force_host_platform_device_count=K)
  -g, --gpus_per_process G   give process i the GPUs i*G .. i*G+G-1
                             (CUDA_VISIBLE_DEVICES); if CUDA_VISIBLE_DEVICES
                             is set, entries i*G .. i*G+G-1 of its list
  -c, --config FILE          config file (default experiments/configs/digits.py)
  -w, --workdir DIR          work directory shared by all processes (required)
  -p, --port PORT            coordinator port (default: a free port)
      --host HOST            coordinator host (default localhost)
      --log_dir DIR          write process i's output to DIR/process_i.log
                             (default: all processes write to this terminal)
      --python PY            Python interpreter (default $PYTHON, else python)
      --entrypoint CMD       command to run instead of "PY -m experiments.train"
                             (split on spaces; for other trainers and tests)
      --grace SECONDS        time the others get to exit after a failure
                             before they are killed (default 10)
      --dry-run              print the commands, one line per process; run nothing
  -h, --help                 show this help

A short option's value may be glued to it: -n2, -n=2 and -n 2 are the same.
Every other argument, and everything after --, is passed to every process
unchanged (e.g. --config.batch_size=64).

Examples:
  launch/local.sh -n 2 -d 2 -w /tmp/digits_2x2
  launch/local.sh -n 2 -d 4 -w /tmp/run --dry-run -- --config.num_train_steps=100
  launch/local.sh -n 2 -g 4 -w runs/two_procs --log_dir runs/two_procs/logs
EOF
}

PROG=local.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

is_uint() { [[ $1 =~ ^[0-9]+$ ]] && (( 10#$1 > 0 )); }

num_processes=2
cpu_devices=""
gpus_per_process=""
config="experiments/configs/digits.py"
workdir=""
port=""
host="localhost"
log_dir=""
python="${PYTHON:-python}"
entrypoint=""
grace=10
dry_run=0
extra=()

# Options take "--opt value" or "--opt=value"; short ones also "-o value", "-ovalue"
# or "-o=value" (split here, so that -n2 is not passed on to the trainer).
while [[ $# -gt 0 ]]; do
  arg=$1
  if [[ $arg == --*=* ]]; then
    opt=${arg%%=*}
    set -- "$opt" "${arg#*=}" "${@:2}"
  elif [[ $arg == -[ndgcwp]?* ]]; then
    value=${arg:2}
    set -- "${arg:0:2}" "${value#=}" "${@:2}"
  fi
  case $1 in
    -h|--help) usage; exit 0 ;;
    -n|--num_processes) need_value "$@"; num_processes=$2; shift 2 ;;
    -d|--cpu_devices) need_value "$@"; cpu_devices=$2; shift 2 ;;
    -g|--gpus_per_process) need_value "$@"; gpus_per_process=$2; shift 2 ;;
    -c|--config) need_value "$@"; config=$2; shift 2 ;;
    -w|--workdir) need_value "$@"; workdir=$2; shift 2 ;;
    -p|--port) need_value "$@"; port=$2; shift 2 ;;
    --host) need_value "$@"; host=$2; shift 2 ;;
    --log_dir) need_value "$@"; log_dir=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --entrypoint) need_value "$@"; entrypoint=$2; shift 2 ;;
    --grace) need_value "$@"; grace=$2; shift 2 ;;
    --dry-run|--dry_run) dry_run=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    # Anything else is the trainer's (with its value re-joined if we split it).
    *) if [[ $arg == --*=* ]]; then extra+=("$arg"); shift 2; else extra+=("$1"); shift; fi ;;
  esac
done

is_uint "$num_processes" || die "--num_processes must be a positive integer, got '$num_processes'"
[[ -z $cpu_devices ]] || is_uint "$cpu_devices" \
  || die "--cpu_devices must be a positive integer, got '$cpu_devices'"
[[ -z $gpus_per_process ]] || is_uint "$gpus_per_process" \
  || die "--gpus_per_process must be a positive integer, got '$gpus_per_process'"
[[ -z $cpu_devices || -z $gpus_per_process ]] \
  || die "--cpu_devices and --gpus_per_process exclude each other (CPU or GPU run?)"
[[ -n $workdir ]] || die "--workdir is required (e.g. --workdir=runs/local_2proc)"
[[ $grace =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds, got '$grace'"
# Base 10 from here on: bash arithmetic reads 08 as a bad octal number.
num_processes=$(( 10#$num_processes )) grace=$(( 10#$grace ))
[[ -z $cpu_devices ]] || cpu_devices=$(( 10#$cpu_devices ))
visible=()
if [[ -n $gpus_per_process ]]; then
  gpus_per_process=$(( 10#$gpus_per_process ))
  # GPUs the caller restricted us to (a shared machine, SLURM without cgroups): hand out those.
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    (( num_processes * gpus_per_process <= ${#visible[@]} )) \
      || die "$num_processes processes x $gpus_per_process GPUs need" \
        "$(( num_processes * gpus_per_process )) GPUs, but" \
        "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' lists ${#visible[@]}"
  fi
fi
if [[ -z $port ]]; then
  # Bind port 0 and let the kernel choose; the tiny race with other programs is acceptable here.
  for py in "$python" python3 python; do
    port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' \
      2>/dev/null) && break
  done
  [[ -n $port ]] || die "could not pick a free port (no Python found); pass --port"
fi
{ is_uint "$port" && (( 10#$port <= 65535 )); } || die "--port must be in 1..65535, got '$port'"

if [[ -n $entrypoint ]]; then
  read -r -a base <<< "$entrypoint"
  [[ ${#base[@]} -gt 0 ]] || die "--entrypoint is empty"
else
  base=("$python" -m experiments.train)
fi

# The command line and environment of process $1, into the arrays envs and cmd.
build() {
  local i=$1
  envs=()
  if [[ -n $cpu_devices ]]; then
    envs+=("JAX_PLATFORMS=cpu"
           "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices")
  fi
  if [[ -n $gpus_per_process ]]; then
    local first=$(( i * gpus_per_process )) ids="" g
    for (( g = first; g < first + gpus_per_process; g++ )); do
      if (( ${#visible[@]} )); then ids+="${ids:+,}${visible[g]}"; else ids+="${ids:+,}$g"; fi
    done
    envs+=("CUDA_VISIBLE_DEVICES=$ids")
  fi
  cmd=("${base[@]}" "--config=$config" "--workdir=$workdir"
       "--coordinator_address=$host:$port" "--num_processes=$num_processes"
       "--process_id=$i" ${extra[@]+"${extra[@]}"})
}

if (( dry_run )); then
  for (( i = 0; i < num_processes; i++ )); do
    build "$i"
    line=$(show_cmd ${envs[@]+"${envs[@]}"} "${cmd[@]}")
    [[ -z $log_dir ]] || line+=" > $(show_cmd "$log_dir/process_$i.log") 2>&1"
    printf '%s\n' "$line"
  done
  exit 0
fi

[[ -z $log_dir ]] || mkdir -p "$log_dir" || die "cannot create --log_dir '$log_dir'"
echo "local.sh: $num_processes processes, coordinator $host:$port, workdir $workdir" >&2

pids=()
# SIGTERM first (the trainer checkpoints on it), SIGKILL after the grace period.
stop_all() {
  local pid t
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null
  done
  for (( t = 0; t < grace * 10; t++ )); do
    local alive=0
    for pid in ${pids[@]+"${pids[@]}"}; do
      [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && alive=1
    done
    (( alive )) || return 0
    sleep 0.1
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null
  done
  return 0
}
# Background jobs of a script ignore SIGINT, so Ctrl-C must be passed on by hand. Exits
# 128 + the signal's number, as the trainer does (130 Ctrl-C, 143 SIGTERM).
on_signal() {
  echo "local.sh: $1; stopping all processes" >&2
  stop_all
  exit "$2"
}
trap 'on_signal interrupted 130' INT
trap 'on_signal "got SIGTERM" 143' TERM

for (( i = 0; i < num_processes; i++ )); do
  build "$i"
  if [[ -n $log_dir ]]; then
    env ${envs[@]+"${envs[@]}"} "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  else
    env ${envs[@]+"${envs[@]}"} "${cmd[@]}" &
  fi
  pids[i]=$!
done

# Poll rather than `wait -n`: macOS still ships bash 3.2.
status=0
remaining=$num_processes
while (( remaining > 0 )); do
  for (( i = 0; i < num_processes; i++ )); do
    pid=${pids[i]}
    [[ -n $pid ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    pids[i]=""
    remaining=$(( remaining - 1 ))
    if (( rc != 0 && status == 0 )); then
      status=$rc
      msg="local.sh: process $i exited with status $rc"
      [[ -z $log_dir ]] || msg+=" (log: $log_dir/process_$i.log)"
      echo "$msg; stopping the others" >&2
      stop_all
    fi
  done
  (( remaining > 0 )) && sleep 0.2
done
exit "$status"
