# Helpers shared by launch/local.sh and the sbatch scripts (sourced, not run).
#
# Environment knobs read here (all optional):
#   SLAM_PYTHON        python with slam_pretrain installed (default: python3). The tests and a
#                      venv checkout use e.g. SLAM_PYTHON=$PWD/.venv/bin/python.
#   SLAM_TRAIN_SCRIPT  the file each training process runs with the trainer's arguments
#                      (default: launch/train_entry.py = `slam-pretrain train ARGS`). Point it
#                      at another script to check a launch without training.

SLAM_PYTHON="${SLAM_PYTHON:-python3}"

# print_cmd LABEL ARGS...: the resolved command, shell-quoted, on one line.
print_cmd() {
  local label="$1"; shift
  printf '[slam] %s:' "$label"; printf ' %q' "$@"; printf '\n'
}

# The caller sets SLAM_HOME (the repository root) before sourcing this file.
SLAM_TRAIN_SCRIPT="${SLAM_TRAIN_SCRIPT:-$SLAM_HOME/launch/train_entry.py}"
