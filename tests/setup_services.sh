#!/usr/bin/env bash
# Installs and starts what the tests need on loopback (the SLURM test cluster). Idempotent.
# Individual tests start their own MLflow and HTTP servers on 127.0.0.1 and stop them.
#
# SLURM: launch/slurm/testcluster/up.sh installs slurm-wlm + munge when missing (root + apt-get)
# and starts a 2-node cluster on this host. SLAM_SLURM_AUTOSTOP=1 marks what it started, and
# tests/test_slurm.py stops exactly that (down.sh) when its tests are done; a cluster that was
# already running stays up. Where it cannot start, its tests skip and say why; under CI=true
# this script fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f launch/slurm/testcluster/up.sh ]; then
  SLAM_SLURM_AUTOSTOP=1 bash launch/slurm/testcluster/up.sh || {
    [ "${CI:-}" = "true" ] && { echo "CI=true: the SLURM test cluster must start" >&2; exit 1; }
    echo "SLURM test cluster unavailable; its tests will skip and say why"
  }
fi
