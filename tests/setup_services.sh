#!/usr/bin/env bash
# Installs and starts what the tests need on loopback (the SLURM test cluster). Idempotent.
# Individual tests start their own MLflow and HTTP servers on 127.0.0.1 and stop them.
set -euo pipefail
if [ -x launch/slurm/testcluster/up.sh ]; then
  bash launch/slurm/testcluster/up.sh || { [ "${CI:-}" = "true" ] && exit 1; echo "SLURM test cluster unavailable; its tests will skip and say why"; }
fi
