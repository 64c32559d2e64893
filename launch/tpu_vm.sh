#!/usr/bin/env bash
# launch/tpu_vm.sh: `python -m hyjax.train` on every worker of an existing Cloud TPU VM (or queued
# resource), through `gcloud compute tpus ... ssh --worker=all`. `launch/tpu_vm.sh -h` for usage.
# A literal ~ in the words built here is meant for the worker's shell to expand:
# shellcheck disable=SC2088
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh (--tpu NAME | --queued-resource QR) --zone ZONE [options] [--] [CONFIG] [key=value ...]

Runs `python3 -m hyjax.train CONFIG key=value ...` on ALL workers of an existing TPU VM at once:

  gcloud compute tpus tpu-vm ssh NAME --zone ZONE [--project P] --worker=all --command "cd REPO && ..."

or, with --queued-resource, on all workers of all nodes (slices) of a queued resource, which is how
multi-slice TPUs are run (with mesh.slices=<number of slices>):

  gcloud compute tpus queued-resources ssh QR --zone ZONE [--project P] --node=all --worker=all --command "..."

It creates nothing. Every worker runs the same command; jax.distributed finds the other workers by
itself. Everything after the options (or after `--`) goes to hyjax.train, each argument quoted with
printf %q, so values with spaces or shell characters arrive unchanged.

Options:
  --tpu NAME               TPU VM name (env TPU_NAME)
  --queued-resource QR     queued resource name instead of --tpu (env QUEUED_RESOURCE)
  --zone ZONE              zone (env ZONE)
  --project PROJECT        project (env PROJECT; default: gcloud's configured project)
  --repo-dir DIR           the hyjax checkout on the workers (env HYJAX_REPO_DIR; default ~/hyjax).
                           A leading ~ (or your local $HOME) means the worker's home directory.
  --venv DIR               activate DIR/bin/activate on the workers first (env HYJAX_TPU_VENV); hyjax
                           needs Python >= 3.11, which older TPU VM images lack
  --python PY              interpreter on the workers (default python3)
  --env KEY=VALUE          export KEY=VALUE on the workers (repeatable), e.g. --env HYJAX_CACHE=/mnt/disk/cache
  --install                first `pip install -e . "jax[tpu]"` in DIR on every worker, then train
  --install-only           only the install step
  --detach                 start the trainers with nohup in the background and return; output goes
                           to --log on each worker (the run survives your ssh session ending)
  --log FILE               log file on each worker with --detach (default ~/hyjax-train.log)
  --gcloud-flag FLAG       extra flag for `gcloud ... ssh` (repeatable), e.g. --gcloud-flag=--internal-ip
  --dry-run                print the gcloud command instead of running it
  -h, --help               this message

The repository must already be on every worker at DIR (e.g. `gcloud compute tpus tpu-vm scp --recurse
--worker=all . NAME:~/hyjax --zone ZONE`, or git clone with --command), with the same data paths.

Storage: logging.output_dir must be a filesystem path every worker can write (gs:// is not
supported); process 0 writes config.yaml, metrics, plots and exports there. The Orbax checkpoints in
checkpoint.dir (default <logging.output_dir>/checkpoints) are written by ALL workers together, so
checkpoint.dir must be shared storage every worker sees at the same path (e.g. a Filestore/NFS mount).
Simplest: logging.output_dir=/mnt/shared/runs/r1 on a shared mount.

Resume: run the same command again (same logging.output_dir and checkpoint.dir); training continues
from the latest checkpoint. On preemption (SIGTERM) the trainer saves a checkpoint and exits 0.

Example:
  launch/tpu_vm.sh --tpu my-v4-32 --zone us-central2-b --install -- \
      configs/quickstart.yaml data.path=/mnt/shared/sst2/train.tsv \
      logging.output_dir=/mnt/shared/runs/r1 mesh.fsdp=16
EOF
}

die() {
  echo "tpu_vm.sh: $*" >&2
  echo "Try 'launch/tpu_vm.sh -h'." >&2
  exit 2
}

# remote_path PATH: PATH as a word for the worker's shell; a leading ~ (or the local $HOME, which the
# local shell put there for an unquoted ~) stays an unquoted ~ so that the worker expands it.
remote_path() {
  local path=$1
  if [[ -n "${HOME:-}" && "$path" == "$HOME" ]]; then
    path="~"
  elif [[ -n "${HOME:-}" && "$path" == "$HOME"/* ]]; then
    path="~/${path#"$HOME"/}"
  fi
  if [[ "$path" == "~" ]]; then
    printf '~'
  elif [[ "$path" == "~/"* ]]; then
    printf '~/%q' "${path#"~/"}"
  else
    printf '%q' "$path"
  fi
}

# display_word WORD: WORD quoted for a POSIX shell, readably (single quotes only when needed).
display_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

tpu="${TPU_NAME:-}"
queued_resource="${QUEUED_RESOURCE:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
repo_dir="${HYJAX_REPO_DIR:-"~/hyjax"}"
venv="${HYJAX_TPU_VENV:-}"
python="python3"
install=0
train=1
detach=0
log="~/hyjax-train.log"
dry_run=0
envs=()
gcloud_flags=()

needs_value() { (($1 >= 2)) || die "$2 needs a value"; }
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --tpu) needs_value $# "$1"; tpu=$2; shift 2 ;;
    --tpu=*) tpu=${1#*=}; shift ;;
    --queued-resource) needs_value $# "$1"; queued_resource=$2; shift 2 ;;
    --queued-resource=*) queued_resource=${1#*=}; shift ;;
    --zone) needs_value $# "$1"; zone=$2; shift 2 ;;
    --zone=*) zone=${1#*=}; shift ;;
    --project) needs_value $# "$1"; project=$2; shift 2 ;;
    --project=*) project=${1#*=}; shift ;;
    --repo-dir) needs_value $# "$1"; repo_dir=$2; shift 2 ;;
    --repo-dir=*) repo_dir=${1#*=}; shift ;;
    --venv) needs_value $# "$1"; venv=$2; shift 2 ;;
    --venv=*) venv=${1#*=}; shift ;;
    --python) needs_value $# "$1"; python=$2; shift 2 ;;
    --python=*) python=${1#*=}; shift ;;
    --env) needs_value $# "$1"; envs+=("$2"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --install) install=1; shift ;;
    --install-only) install=1; train=0; shift ;;
    --detach) detach=1; shift ;;
    --log) needs_value $# "$1"; log=$2; shift 2 ;;
    --log=*) log=${1#*=}; shift ;;
    --gcloud-flag) needs_value $# "$1"; gcloud_flags+=("$2"); shift 2 ;;
    --gcloud-flag=*) gcloud_flags+=("${1#*=}"); shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (hyjax.train's own arguments go after --)" ;;
    *) break ;;  # the first argument that is not ours: it and the rest go to hyjax.train
  esac
done
train_args=("$@")

if [[ -n "$tpu" && -n "$queued_resource" ]]; then
  die "give --tpu or --queued-resource, not both"
fi
[[ -n "$tpu" || -n "$queued_resource" ]] || die "no TPU: give --tpu NAME (or TPU_NAME) or --queued-resource QR"
[[ -n "$zone" ]] || die "no zone: give --zone ZONE (or ZONE)"
for kv in ${envs[@]+"${envs[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '$kv'"
done
for arg in ${train_args[@]+"${train_args[@]}"}; do
  case "$arg" in
    --coordinator | --coordinator=* | --num-processes | --num-processes=* | --process-id | --process-id=*)
      die "$arg: on a TPU VM jax.distributed finds the workers by itself" ;;
  esac
done

# The command every worker runs (its login shell, bash on TPU VM images).
remote="set -e; cd $(remote_path "$repo_dir")"
if [[ -n "$venv" ]]; then
  remote+="; source $(remote_path "$venv")/bin/activate"
fi
for kv in ${envs[@]+"${envs[@]}"}; do
  remote+="; export ${kv%%=*}=$(printf '%q' "${kv#*=}")"
done
remote+="; export PYTHONUNBUFFERED=1"
py=$(printf '%q' "$python")
if ((install)); then
  remote+="; $py -m pip install -e . $(printf '%q' 'jax[tpu]')"
fi
if ((train)); then
  train_cmd="$py -m hyjax.train"
  if ((${#train_args[@]})); then
    train_cmd+=$(printf ' %q' "${train_args[@]}")
  fi
  if ((detach)); then
    log_word=$(remote_path "$log")
    remote+="; nohup $train_cmd > $log_word 2>&1 < /dev/null & echo \"\$(hostname): hyjax.train started (pid \$!), log $log_word\""
  else
    remote+="; exec $train_cmd"
  fi
fi

if [[ -n "$queued_resource" ]]; then
  cmd=(gcloud compute tpus queued-resources ssh "$queued_resource" --zone "$zone")
  [[ -z "$project" ]] || cmd+=(--project "$project")
  cmd+=(--node=all --worker=all)
else
  cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone")
  [[ -z "$project" ]] || cmd+=(--project "$project")
  cmd+=(--worker=all)
fi
cmd+=(${gcloud_flags[@]+"${gcloud_flags[@]}"} --command "$remote")

if ((dry_run)); then
  line=""
  for word in "${cmd[@]}"; do
    line+="$(display_word "$word") "
  done
  echo "${line% }"
  exit 0
fi
command -v gcloud >/dev/null 2>&1 || die "gcloud (the Google Cloud CLI) is not on PATH"
exec "${cmd[@]}"
