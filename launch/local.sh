#!/usr/bin/env bash
# SLAM pretraining on one machine with N processes, via torchrun or the deepspeed launcher.
#
#   launch/local.sh [--launcher torchrun|deepspeed] [--nproc N] TRAINER ARGS...
#   launch/local.sh --nproc 2 --config configs/tiny_cpu.yaml --set run.out_dir=runs/x
#
# TRAINER ARGS go to `slam-pretrain train`. The resolved command is printed first.
# Defaults come from the environment: SLAM_LAUNCHER (torchrun), SLAM_NPROC (GPUs seen by
# nvidia-smi, else 1), SLAM_PYTHON (python3), SLAM_MASTER_PORT (deepspeed only, 29500),
# SLAM_TRAIN_SCRIPT (launch/train_entry.py). On CPU set DS_ACCELERATOR=cpu for DeepSpeed.
set -euo pipefail
SLAM_HOME="${SLAM_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=common.sh
. "$SLAM_HOME/launch/common.sh"

usage() { echo "usage: launch/local.sh [--launcher torchrun|deepspeed] [--nproc N] TRAINER ARGS..." >&2; exit 2; }
launcher="${SLAM_LAUNCHER:-torchrun}"
nproc="${SLAM_NPROC:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --launcher) [ $# -ge 2 ] || usage; launcher="$2"; shift 2 ;;
    --launcher=*) launcher="${1#*=}"; shift ;;
    --nproc) [ $# -ge 2 ] || usage; nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ -z "$nproc" ]; then
  nproc="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${nproc:-0}" -gt 0 ] || nproc=1
fi
case "$nproc" in ''|*[!0-9]*|0) echo "launch/local.sh: --nproc=$nproc is invalid: use a whole number >= 1" >&2; exit 2 ;; esac

case "$launcher" in
  torchrun)
    # --standalone: rendezvous on localhost with a free port.
    cmd=("$SLAM_PYTHON" -u -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc"
         "$SLAM_TRAIN_SCRIPT" "$@") ;;
  deepspeed)
    # A one-line hostfile gives N slots on this machine; CPU-only machines have no device count
    # for --num_gpus to trim. No ssh: one host takes the launcher's local path.
    hostfile="$(mktemp "${TMPDIR:-/tmp}/slam-hostfile.XXXXXX")"
    echo "localhost slots=$nproc" >"$hostfile"
    cmd=("$SLAM_PYTHON" -u -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh_check
         --master_addr 127.0.0.1 --master_port "${SLAM_MASTER_PORT:-29500}"
         "$SLAM_TRAIN_SCRIPT" "$@") ;;
  *) echo "launch/local.sh: --launcher=$launcher is invalid: use torchrun or deepspeed" >&2; exit 2 ;;
esac
print_cmd command "${cmd[@]}"
if [ "$launcher" = deepspeed ]; then
  # Not exec: the hostfile is removed when the launcher is done.
  rc=0; "${cmd[@]}" || rc=$?
  rm -f "$hostfile"; exit "$rc"
fi
exec "${cmd[@]}"
