#!/usr/bin/env bash
# Starts the local SLURM test cluster: one slurmctld and two slurmd ("node1", "node2") on this
# host, on 127.0.0.1, with a private munged. Installs slurm-wlm + munge with apt when missing.
# Idempotent: running daemons are left alone. Needs root. Exit 0 once `sinfo` shows both nodes
# idle; non-zero with a one-line reason otherwise.
#
#   bash launch/slurm/testcluster/up.sh          # then: . launch/slurm/testcluster/env.sh; sinfo
#   bash launch/slurm/testcluster/down.sh        # stops it again
#
# Env: SLAM_SLURM_DIR (default /var/lib/slam-testcluster), SLAM_SLURM_CTLD_PORT, SLAM_SLURM_NODE_PORTS
# (see common.sh), SLAM_SLURM_AUTOSTOP=1 (leave a marker so the test session stops what this
# call started), SLAM_SLURM_UP_TIMEOUT (seconds to wait for idle nodes, default 90).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"
D="$SLAM_SLURM_DIR"

die() { echo "testcluster up: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (it installs packages, edits /etc/hosts and runs slurmd as root)"
export PATH="$PATH:/usr/sbin:/sbin"

# 1. Packages. The postinst scripts must not start the system-wide services (our daemons use
#    private paths): a policy-rc.d that says "no" is in place only during the install.
need_install=0
for b in slurmctld slurmd slurmstepd sinfo sbatch srun scontrol munged mungekey; do
  command -v "$b" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
  command -v apt-get >/dev/null 2>&1 || die "slurm-wlm/munge are not installed and there is no apt-get"
  echo "testcluster up: installing slurm-wlm and munge with apt-get"
  policy=/usr/sbin/policy-rc.d; made_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1; fi
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$D/log"; apt_log="$D/log/apt.log"
  apt_install() { apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$apt_log" 2>&1; }
  # Try the package lists at hand first; refresh them only when that fails.
  apt_install || { apt-get update -q >>"$apt_log" 2>&1 || true; apt_install; } || {
    [ "$made_policy" = 1 ] && rm -f "$policy"; tail -5 "$apt_log" >&2; die "apt-get install slurm-wlm munge failed (log: $apt_log)"; }
  [ "$made_policy" = 1 ] && rm -f "$policy"
fi

# 2. Node names resolve to loopback (torchrun/deepspeed connect to the first node by name), and
#    so does this host's own name when nothing else resolves it (torchrun hands it to workers).
if ! grep -q '# slam-testcluster$' /etc/hosts; then
  names="$SLAM_SLURM_NODES"
  getent hosts "$(hostname)" >/dev/null 2>&1 || names="$names $(hostname)"
  echo "127.0.0.1 $names # slam-testcluster" >>/etc/hosts
fi

# 3. Private directories, munge key and slurm.conf.
mkdir -p "$D"/{etc,munge,run,log,state/ctld} && chmod 755 "$D"
for n in $SLAM_SLURM_NODES; do mkdir -p "$D/state/$n"; done
chmod 755 "$D/munge"   # munged wants its socket dir traversable by all
if [ ! -s "$D/munge/munge.key" ]; then
  mungekey --create --keyfile="$D/munge/munge.key" --force >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$D/munge/munge.key"
fi
host="$(hostname -s)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
sed -e "s|@DIR@|$D|g" -e "s|@HOST@|$host|g" -e "s|@CTLD_PORT@|$SLAM_SLURM_CTLD_PORT|g" \
    -e "s|@NODE_PORTS@|$SLAM_SLURM_NODE_PORTS|g" -e "s|@MEM_MB@|$mem_mb|g" \
    "$here/slurm.conf.in" >"$D/etc/slurm.conf.new"
if ! cmp -s "$D/etc/slurm.conf.new" "$D/etc/slurm.conf"; then
  mv "$D/etc/slurm.conf.new" "$D/etc/slurm.conf"
  conf_changed=1
else
  rm -f "$D/etc/slurm.conf.new"; conf_changed=0
fi

# 4. Daemons. Each is started only when its pid file does not name a live process.
started=()
if ! pid_alive "$D/run/munged.pid"; then
  rm -f "$D/munge/munge.socket" "$D/munge/munge.socket.lock"
  munged --force --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket" \
    --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" \
    || die "munged failed to start (log: $D/log/munged.log)"
  started+=(munged)
fi
if [ "$conf_changed" = 1 ] && pid_alive "$D/run/slurmctld.pid"; then
  # A changed slurm.conf (ports, host name) needs fresh daemons.
  bash "$here/down.sh" --keep-munge >/dev/null
fi
if ! pid_alive "$D/run/slurmctld.pid"; then
  slurmctld -f "$SLURM_CONF" || die "slurmctld failed to start (log: $D/log/slurmctld.log)"
  started+=(slurmctld)
fi
for n in $SLAM_SLURM_NODES; do
  if ! pid_alive "$D/run/slurmd-$n.pid"; then
    slurmd -f "$SLURM_CONF" -N "$n" || die "slurmd -N $n failed to start (log: $D/log/slurmd-$n.log)"
    started+=("slurmd-$n")
  fi
done
if [ "${#started[@]}" -gt 0 ] && [ "${SLAM_SLURM_AUTOSTOP:-0}" = 1 ]; then
  touch "$D/run/autostop"
fi

# 5. Wait until both nodes are idle (bounded); nodes left down by an earlier run are resumed.
deadline=$(( SECONDS + ${SLAM_SLURM_UP_TIMEOUT:-90} ))
resumed=0
while :; do
  states="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)"
  n_idle="$(echo "$states" | awk '$2 == "idle" || $2 == "mix" || $2 == "alloc"' | wc -l)"
  [ "$n_idle" -ge 2 ] && break
  if [ "$resumed" = 0 ] && echo "$states" | grep -Eq ' (down|drain|drng|fail)'; then
    scontrol update NodeName=node1,node2 State=RESUME >/dev/null 2>&1 || true
    resumed=1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "$states" >&2
    die "nodes not idle after ${SLAM_SLURM_UP_TIMEOUT:-90}s (logs: $D/log/)"
  fi
  sleep 1
done
echo "testcluster up: ${started[*]:-nothing to start}; nodes:" $states
echo "testcluster up: export SLURM_CONF=$SLURM_CONF   (or: . launch/slurm/testcluster/env.sh)"
