# Source this to use the local test cluster from a shell:  . launch/slurm/testcluster/env.sh
# (sets SLURM_CONF so sinfo/sbatch/srun/scontrol talk to it).
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
