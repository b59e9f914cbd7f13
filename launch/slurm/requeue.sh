# Preemption handling shared by the sbatch scripts (sourced, not run).
#
# SIGUSR1 to the batch shell means "stop and come back": it comes from
# `#SBATCH --signal=B:USR1@SECONDS` (the time limit is near) or from
# `scancel --batch --signal=USR1 JOBID` (an operator or a preemption hook). The shell passes it on
# with `scancel --signal=USR1 JOBID`, which reaches every process of the job's steps (not the
# batch shell); the trainer finishes its current step, writes a checkpoint, flushes MLflow and
# exits 143. Then the script requeues the job and the next attempt resumes from that checkpoint
# (--resume auto), in the same MLflow run.
#
# SIGTERM to the batch shell means SLURM is ending the job itself (scancel, time limit reached,
# preemption): SLURM sends SIGTERM to the training processes too, and SIGKILL KillWait seconds
# later. The shell only waits for them (they checkpoint on SIGTERM) and does not requeue: a
# cancelled job must stay cancelled (`scontrol requeue` would bring it back), and a preempted
# job is requeued by SLURM itself (PreemptMode=REQUEUE with --requeue).
#
#   SLAM_MAX_REQUEUES  give up requeueing after this many restarts (default 50)

SLAM_STOP_SIGNAL=""

_slam_on_usr1() {
  # The first USR1 asks the training processes to stop; repeats only note it.
  if [ -z "$SLAM_STOP_SIGNAL" ]; then
    SLAM_STOP_SIGNAL=USR1
    echo "[slam] $(date +%FT%T) batch shell got SIGUSR1: asking the training processes to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || echo "[slam] scancel --signal=USR1 $SLURM_JOB_ID failed"
  fi
}

_slam_on_term() {
  echo "[slam] $(date +%FT%T) batch shell got SIGTERM: SLURM is ending the job; waiting for the training processes"
}

# run_step CMD...: runs the training step in the background and waits for it while the traps
# stay responsive (bash runs a trap only between commands, and `wait` is interruptible).
# Sets SLAM_STEP_RC.
run_step() {
  trap _slam_on_usr1 USR1
  trap _slam_on_term TERM
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
  wait "$pid"; SLAM_STEP_RC=$?
}

# finish: requeue after a stop asked by SIGUSR1, else exit with the step's status (a lost rank
# or any failure fails the job; submitting again resumes from the last complete checkpoint).
finish() {
  local rc="$SLAM_STEP_RC" restarts="${SLURM_RESTART_COUNT:-0}"
  if [ -n "$SLAM_STOP_SIGNAL" ] && [ "$rc" -ne 0 ]; then
    if [ "$restarts" -ge "${SLAM_MAX_REQUEUES:-50}" ]; then
      echo "[slam] stopped (exit $rc) but restart $restarts reached SLAM_MAX_REQUEUES; not requeueing"
      exit "$rc"
    fi
    echo "[slam] $(date +%FT%T) training stopped on SIGUSR1 (exit $rc); requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    # From inside the job this ends the job now and puts it back in the queue (same job id,
    # same output file thanks to --open-mode=append).
    scontrol requeue "$SLURM_JOB_ID" && exit 143
    echo "[slam] scontrol requeue failed (requeue disabled on this cluster?); submit again to resume"
    exit "$rc"
  fi
  echo "[slam] $(date +%FT%T) training step finished with exit code $rc"
  exit "$rc"
}
