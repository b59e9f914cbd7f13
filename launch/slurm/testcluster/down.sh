#!/usr/bin/env bash
# Stops the local SLURM test cluster started by up.sh (slurmd x2, slurmctld, munged), using the
# pid files under $SLAM_SLURM_DIR. Leaves packages, /etc/hosts, configs and logs in place.
#   --keep-munge   leave munged running (up.sh uses this when slurm.conf changed)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"
D="$SLAM_SLURM_DIR"
keep_munge=0; [ "${1:-}" = "--keep-munge" ] && keep_munge=1

# stop NAME PIDFILE: SIGTERM, wait up to 15 s, then SIGKILL.
stop() {
  local name="$1" file="$2" pid i
  pid_alive "$file" || { rm -f "$file"; return 0; }
  pid="$(cat "$file")"
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  rm -f "$file"
  echo "testcluster down: stopped $name ($pid)"
}
for n in $SLAM_SLURM_NODES; do stop "slurmd-$n" "$D/run/slurmd-$n.pid"; done
stop slurmctld "$D/run/slurmctld.pid"
[ "$keep_munge" = 1 ] || stop munged "$D/run/munged.pid"
rm -f "$D/run/autostop"
exit 0
