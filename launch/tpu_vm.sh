#!/usr/bin/env bash
# Runs experiments.train on every worker of a Cloud TPU VM (a pod slice has
# several) over `gcloud ... tpu-vm ssh --worker=all` with --distributed=on; on TPU
# VMs jax.distributed.initialize() finds the other workers by itself.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] [--] [trainer flags...]

Runs `cd REMOTE_DIR && PY -m experiments.train --config=... --workdir=...` on
every worker of a Cloud TPU VM at once with
`gcloud compute tpus tpu-vm ssh TPU --zone=ZONE --worker=all --command=...`.
The repository (and its Python environment) must already be on every worker.

Options:
  -t, --tpu NAME         TPU VM name (default $TPU_NAME)
  -z, --zone ZONE        zone (default $ZONE)
      --project PROJECT  GCP project (default $PROJECT, else gcloud's default)
      --worker WORKERS   workers to run on: all, 0, 1-3, ... (default all)
  -c, --config FILE      config file, relative to REMOTE_DIR
                         (default experiments/configs/digits.py)
  -w, --workdir DIR      work directory (default $WORKDIR; required). On a slice
                         with several workers use a bucket (gs://...) that all
                         of them can write: checkpoints are written by all.
      --remote_dir DIR   the repository on each worker, relative to the home
                         directory or absolute (default gru_jax)
      --python PY        Python on the workers (default python3); a leading
                         ~/ is expanded on the worker, as for --remote_dir
      --setup CMD        shell command run on each worker first, e.g.
                         "source ~/venv/bin/activate" or "git pull"
      --gcloud_flag FLAG extra flag for gcloud (repeatable), e.g. --internal-ip
      --dry-run          print the gcloud command; run nothing
  -h, --help             show this help

Every other argument, and everything after --, is passed to the trainer on
every worker (e.g. --config.batch_size=1024).
Stopping gcloud (Ctrl-C) may leave the trainers running on the workers.

Examples:
  TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_vm.sh -w gs://my-bucket/runs/d1
  launch/tpu_vm.sh -t my-v4-32 -z us-central2-b -w gs://b/r --setup "source venv/bin/activate" \
      --dry-run -- --config.num_train_steps=1000
EOF
}

PROG=tpu_vm.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
worker=all
config="experiments/configs/digits.py"
workdir=${WORKDIR:-}
remote_dir="gru_jax"
python="python3"
setup=""
gcloud_flags=()
dry_run=0
extra=()

while [[ $# -gt 0 ]]; do
  arg=$1
  if [[ $arg == --*=* ]]; then
    set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
  fi
  case $1 in
    -h|--help) usage; exit 0 ;;
    -t|--tpu) need_value "$@"; tpu=$2; shift 2 ;;
    -z|--zone) need_value "$@"; zone=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    -c|--config) need_value "$@"; config=$2; shift 2 ;;
    -w|--workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --remote_dir) need_value "$@"; remote_dir=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --setup) need_value "$@"; setup=$2; shift 2 ;;
    --gcloud_flag) [[ $# -ge 2 ]] || die "--gcloud_flag needs a value"  # itself a --flag
      gcloud_flags+=("$2"); shift 2 ;;
    --dry-run|--dry_run) dry_run=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    *) if [[ $arg == --*=* ]]; then extra+=("$arg"); shift 2; else extra+=("$1"); shift; fi ;;
  esac
done

[[ -n $tpu ]] || die "--tpu (or TPU_NAME) is required"
[[ -n $zone ]] || die "--zone (or ZONE) is required"
[[ -n $workdir ]] || die "--workdir (or WORKDIR) is required, e.g. gs://my-bucket/runs/digits"
[[ -n $remote_dir ]] || die "--remote_dir must not be empty"
if [[ $workdir != *://* && $worker != 0 ]]; then
  echo "tpu_vm.sh: note: workdir '$workdir' is a local path; on a slice with several workers" \
    "each would write its own copy, so use gs://... there" >&2
fi

# A path quoted for the remote shell, with a leading ~/ left unquoted so that it expands ~.
remote_path() {
  if [[ $1 == "~/"* ]]; then
    printf '~/%s\n' "$(show_cmd "${1#\~/}")"
  else
    show_cmd "$1"
  fi
}

# One string for the remote shell: the trainer's words quoted, --setup verbatim.
remote="cd $(remote_path "$remote_dir") && "
[[ -z $setup ]] || remote+="$setup && "
remote+="$(remote_path "$python") "
# --distributed=on: JAX's Cloud TPU VM detection asks the metadata server, which
# --distributed=auto's environment check cannot see; later trainer flags still win.
remote+=$(show_cmd -m experiments.train "--config=$config" "--workdir=$workdir" \
  --distributed=on ${extra[@]+"${extra[@]}"})

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[[ -z $project ]] || cmd+=("--project=$project")
cmd+=("--worker=$worker" ${gcloud_flags[@]+"${gcloud_flags[@]}"} "--command=$remote")

if (( dry_run )); then
  show_cmd "${cmd[@]}"
  exit 0
fi
command -v gcloud > /dev/null || die "gcloud is not installed (see https://cloud.google.com/sdk/docs/install)"
exec "${cmd[@]}"
