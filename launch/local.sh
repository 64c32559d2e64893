#!/usr/bin/env bash
# launch/local.sh: several `python -m hyjax.train` processes on this CPU machine, joined into one run.
# `launch/local.sh -h` for usage.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [--] [CONFIG] [key=value ...]

Starts N processes of `python -m hyjax.train CONFIG key=value ...` on this machine, joined into one
data-parallel run by jax.distributed (over gloo): process i gets
`--coordinator localhost:PORT --num-processes N --process-id i`, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=K (K CPU devices per process, N*K in the run).
Everything after the options (or after `--`) goes to hyjax.train unchanged; put `--` first
when it starts with an option of hyjax.train (`-- --config quickstart train.steps=5`).

Options:
  -n, --processes N            processes to start (default 2)
  -d, --devices-per-process K  CPU devices of each process (default 1)
  -p, --port PORT              coordinator port on localhost (default: a free port)
      --python PY              interpreter (default: $PYTHON, else `python` on PATH)
      --grace-period S         seconds between SIGTERM and SIGKILL when stopping the processes
                               after a failure or a stop request (default 60)
  -h, --help                   this message

Each process's stdout and stderr lines are printed with a `[p0] `, `[p1] `, ... prefix; this script's
own messages start with `[local] ` and go to stderr. It waits for every process. When one exits
non-zero the others get SIGTERM (SIGKILL after the grace period), and the script exits with the first
non-zero exit code; 0 when all exit 0. Ctrl-C, SIGTERM and SIGHUP are passed on to every process as
SIGTERM: the trainer saves a checkpoint of its last finished step and exits 0. A second Ctrl-C kills
them.

global_batch_size must divide by N*K. Resume: run the same command again (same logging.output_dir).

Example (from the repository root):
  launch/local.sh -n 2 -d 2 -- configs/quickstart.yaml logging.output_dir=runs/local2x2 train.steps=20
EOF
}

die() {
  echo "local.sh: $*" >&2
  echo "Try 'launch/local.sh -h'." >&2
  exit 2
}

positive_int() {  # positive_int NAME VALUE
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

processes=2
devices=1
port=""
python="${PYTHON:-python}"
grace=60

while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    -n | --processes) (($# >= 2)) || die "$1 needs a value"; processes=$2; shift 2 ;;
    --processes=*) processes=${1#*=}; shift ;;
    -d | --devices-per-process) (($# >= 2)) || die "$1 needs a value"; devices=$2; shift 2 ;;
    --devices-per-process=*) devices=${1#*=}; shift ;;
    -p | --port) (($# >= 2)) || die "$1 needs a value"; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --python) (($# >= 2)) || die "$1 needs a value"; python=$2; shift 2 ;;
    --python=*) python=${1#*=}; shift ;;
    --grace-period) (($# >= 2)) || die "$1 needs a value"; grace=$2; shift 2 ;;
    --grace-period=*) grace=${1#*=}; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (hyjax.train's own arguments go after --)" ;;
    *) break ;;  # the first argument that is not ours: it and the rest go to hyjax.train
  esac
done
train_args=("$@")

positive_int --processes "$processes"
positive_int --devices-per-process "$devices"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace-period must be a whole number of seconds, got '$grace'"
for arg in ${train_args[@]+"${train_args[@]}"}; do
  case "$arg" in
    --coordinator | --coordinator=* | --num-processes | --num-processes=* | --process-id | --process-id=*)
      die "$arg is set by this script (use --port / --processes instead)" ;;
  esac
done
command -v "$python" >/dev/null 2>&1 || die "no Python interpreter '$python' (activate the venv or pass --python)"
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
positive_int --port "$port"

# The user's XLA_FLAGS minus any host device count, then ours.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

say() { echo "[local] $*" >&2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/hyjax-local.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

pids=()       # trainer process ids, by process index
prefixers=()  # the line-prefixing readers of their output
finished=()   # 1 once a process has been waited for
stopping=0    # 1 once the processes have been sent SIGTERM
kill_at=""    # SECONDS value after which the remaining processes get SIGKILL

signal_running() {  # signal_running SIG: send SIG to every started process not yet waited for
  local i
  for ((i = 0; i < ${#pids[@]}; i++)); do
    ((finished[i])) || kill -s "$1" "${pids[i]}" 2>/dev/null || true
  done
}

stop_all() {  # stop_all REASON: SIGTERM to every running process, SIGKILL after the grace period
  if ((stopping)); then
    return
  fi
  stopping=1
  kill_at=$((SECONDS + grace))
  say "$1: sending SIGTERM to the running processes (SIGKILL in ${grace}s)"
  signal_running TERM
}

# shellcheck disable=SC2329  # called by the trap below
on_signal() {
  if ((stopping)); then
    say "second stop request: sending SIGKILL"
    signal_running KILL
  else
    stop_all "stop requested"
  fi
}
trap on_signal INT TERM HUP

say "$processes processes x $devices CPU device(s), coordinator localhost:$port"
for ((i = 0; i < processes && !stopping; i++)); do
  fifo="$tmp/p$i"
  mkfifo "$fifo"
  # The prefixer ignores INT/TERM/HUP so that a stopping trainer's last lines still get printed.
  (trap '' INT TERM HUP; exec awk -v tag="[p$i] " '{ print tag $0; fflush() }') <"$fifo" &
  prefixers+=("$!")
  JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" PYTHONUNBUFFERED=1 \
    "$python" -m hyjax.train ${train_args[@]+"${train_args[@]}"} \
    --coordinator "localhost:$port" --num-processes "$processes" --process-id "$i" >"$fifo" 2>&1 &
  finished+=(0)
  pids+=("$!")
done

started=${#pids[@]}
first_rc=0
remaining=$started
while ((remaining > 0)); do
  for ((i = 0; i < started; i++)); do
    ((finished[i])) && continue
    # bash reaps its exited children in the background, so a finished process no longer answers.
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    finished[i]=1
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      say "process $i exited with code $rc"
      ((first_rc != 0)) || first_rc=$rc
      stop_all "process $i failed"
    fi
  done
  if ((remaining > 0)); then
    if [[ -n "$kill_at" ]] && ((SECONDS >= kill_at)); then
      say "grace period over: sending SIGKILL"
      signal_running KILL
      kill_at=""
    fi
    sleep 0.2 || true  # a Ctrl-C also interrupts the sleep: the trap handles it, keep waiting
  fi
done

for pid in ${prefixers[@]+"${prefixers[@]}"}; do
  wait "$pid" 2>/dev/null || true
done
if ((first_rc == 0 && started == processes)); then
  say "all $processes processes exited with code 0"
elif ((first_rc == 0)); then
  say "stopped while starting: $started of $processes processes started"
fi
exit "$first_rc"
