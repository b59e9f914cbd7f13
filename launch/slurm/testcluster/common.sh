# Shared settings of the local SLURM test cluster (sourced by up.sh, down.sh, env.sh).
# Override any of these in the environment before calling the scripts.
SLAM_SLURM_DIR="${SLAM_SLURM_DIR:-/var/lib/slam-testcluster}"   # configs, state, logs, pids
SLAM_SLURM_CTLD_PORT="${SLAM_SLURM_CTLD_PORT:-16817}"          # slurmctld
SLAM_SLURM_NODE_PORTS="${SLAM_SLURM_NODE_PORTS:-17001-17002}"  # slurmd node1, node2
SLAM_SLURM_NODES="node1 node2"
export SLURM_CONF="$SLAM_SLURM_DIR/etc/slurm.conf"

# pid_alive FILE: true when FILE holds the pid of a running process.
pid_alive() {
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}
