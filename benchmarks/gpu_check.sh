#!/usr/bin/env bash
# One GPU check of the real trainer against a bare PyTorch loop, in under 8 minutes on one H200.
#
#   benchmarks/gpu_check.sh              # on a CUDA machine: slam_1b, bf16, 1 GPU
#   benchmarks/gpu_check.sh --dry-run    # anywhere: the same steps on the tiny_cpu model, fp32, gloo
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh
#
# What it does, all in one run:
#   1. prepares a synthetic dataset on the spot: random words in a jsonl file and a word-level
#      tokenizer.json of exactly model.vocab_size tokens (32,768 for slam_1b), turned into shards by
#      the real `slam-pretrain prepare` (data.tokenizer = that file);
#   2. the bare loop on the same model (benchmarks/bench_gpu.py's train_step_fn: bf16 autocast, fp32
#      master weights, fused AdamW, the engine's activation checkpointing), torch.compile off and on;
#   3. the real `slam-pretrain train` (launch/local.sh) for the preset with
#        FSDP2 (torchrun)  and  DeepSpeed ZeRO-2 (the deepspeed launcher),
#      bf16, activation checkpointing per EF cycle, engine.compile off and on;
#   4. a table: tokens/s, MFU, peak memory, trainer/bare ratio; the same as JSON (summary.json).
#
# Throughput is per device, from the steps after the warm-up (metrics.jsonl records average over
# train.log_interval steps; the records up to GPU_CHECK_WARMUP are left out: start-up, compilation).
# The bare loop's MFU uses the trainer's peak (its "MFU peak:" line: the data-sheet table on an
# H100/H200, 989 TFLOP/s bf16). Every micro-batch is one optimizer step (global batch = micro x
# processes) so both loops do the same work per step. Once the last step's record is in
# metrics.jsonl the training processes are SIGKILLed: the final evaluation, the checkpoint (12-14 GB
# at 1B) and the export are not part of the check. Runs go in the order bare, fsdp, deepspeed
# (compile off), fsdp, deepspeed (compile on); a run that cannot start with GPU_CHECK_MIN_RUN_S
# left of GPU_CHECK_BUDGET_S is skipped and says so, and each run is stopped at its time limit
# (figures from what it logged by then, marked "partial").
#
# Settings (environment; defaults for GPU / dry run):
#   GPU_CHECK_CONFIG      configs/slam_1b.yaml / configs/tiny_cpu.yaml
#   GPU_CHECK_MICRO_BATCH 8 / 8       sequences per device per step (slam_1b's preset says 4 at 32 GPUs)
#   GPU_CHECK_STEPS       30 / 8      steps per run
#   GPU_CHECK_WARMUP      10 / 4      steps left out of the figures (a multiple of the log interval)
#   GPU_CHECK_LOG_INTERVAL 5 / 2
#   GPU_CHECK_NPROC       1           processes (GPUs) per trainer run; figures are per device
#   GPU_CHECK_COMPILE     "off on" / "off"   compile modes; the dry run skips compile unless
#                                     GPU_CHECK_COMPILE="off on" (inductor on 2 CPU cores: minutes)
#   GPU_CHECK_ENGINES     "fsdp deepspeed"
#   GPU_CHECK_BUDGET_S    450 / 900   whole-check budget (seconds); GPU_CHECK_MIN_RUN_S 45 / 30
#   GPU_CHECK_RUN_TIMEOUT_S 150 / 240 per trainer run, compile off; compile on gets 1.5x
#   GPU_CHECK_SET         extra `--set` overrides for every run, space-separated (key=value ...)
#   GPU_CHECK_OUT         results folder (default $OUT/gpu_check if $OUT is set, else a temporary
#                         folder that is kept and printed); the dataset and run folders live in a
#                         temporary folder removed at exit (GPU_CHECK_KEEP=1 keeps it)
#   SLAM_PYTHON           python with torch/deepspeed/tokenizers (default .venv/bin/python, else python3)
# Exit code: 0 when every run gave figures (the aims are reported, not enforced), 1 otherwise.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY="${GPU_CHECK_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
[ "$DRY" = 1 ] || DRY=0

if [ -z "${SLAM_PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then SLAM_PYTHON="$REPO/.venv/bin/python"; else SLAM_PYTHON=python3; fi
fi
export SLAM_PYTHON
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
HELPER=("$SLAM_PYTHON" "$REPO/benchmarks/gpu_check.py")
T0=$SECONDS

if [ "$DRY" = 1 ]; then
  CONFIG="${GPU_CHECK_CONFIG:-configs/tiny_cpu.yaml}"
  DEVICE=cpu PRECISION=fp32
  MICRO="${GPU_CHECK_MICRO_BATCH:-8}" STEPS="${GPU_CHECK_STEPS:-8}" WARMUP="${GPU_CHECK_WARMUP:-4}"
  LOG_INTERVAL="${GPU_CHECK_LOG_INTERVAL:-2}" COMPILE_MODES="${GPU_CHECK_COMPILE:-off}"
  NO_COMPILE_WHY="in the dry run, as inductor on a CPU takes minutes per cold process (GPU_CHECK_COMPILE='off on' runs it)"
  BUDGET="${GPU_CHECK_BUDGET_S:-900}" MIN_RUN="${GPU_CHECK_MIN_RUN_S:-30}" RUN_TIMEOUT="${GPU_CHECK_RUN_TIMEOUT_S:-240}"
  # Light on a shared CPU: one thread per process, DeepSpeed's CPU accelerator, one encoder process.
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
  EXTRA_DATA=(data.num_workers=1 data.encode_procs=1 data.encode_threads=1)
else
  CONFIG="${GPU_CHECK_CONFIG:-configs/slam_1b.yaml}"
  DEVICE=cuda PRECISION=bf16
  MICRO="${GPU_CHECK_MICRO_BATCH:-8}" STEPS="${GPU_CHECK_STEPS:-30}" WARMUP="${GPU_CHECK_WARMUP:-10}"
  LOG_INTERVAL="${GPU_CHECK_LOG_INTERVAL:-5}" COMPILE_MODES="${GPU_CHECK_COMPILE:-off on}"
  BUDGET="${GPU_CHECK_BUDGET_S:-450}" MIN_RUN="${GPU_CHECK_MIN_RUN_S:-45}" RUN_TIMEOUT="${GPU_CHECK_RUN_TIMEOUT_S:-150}"
  EXTRA_DATA=()
  NO_COMPILE_WHY="not selected (GPU_CHECK_COMPILE='${COMPILE_MODES}')"
fi
NPROC="${GPU_CHECK_NPROC:-1}"
ENGINES="${GPU_CHECK_ENGINES:-fsdp deepspeed}"
read -r -a USER_SETS <<<"${GPU_CHECK_SET:-}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
if [ -n "${GPU_CHECK_OUT:-}" ]; then RESULTS="$GPU_CHECK_OUT"
elif [ -n "${OUT:-}" ]; then RESULTS="$OUT/gpu_check"
else RESULTS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_results.XXXXXX")"; fi
mkdir -p "$RESULTS"
rm -f "$RESULTS"/*.json "$RESULTS"/*.log "$RESULTS"/*.jsonl "$RESULTS"/skipped.tsv
cleanup() {
  if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "[gpu_check] kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
left() { echo $((BUDGET - (SECONDS - T0))); }

# -- preflight ---------------------------------------------------------------------------------
log "repo $REPO | python $SLAM_PYTHON | results $RESULTS | $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU)' || echo GPU)"
"$SLAM_PYTHON" - "$DEVICE" <<'EOF'
import sys
missing = []
for mod in ("torch", "deepspeed", "tokenizers", "sentencepiece", "yaml", "psutil", "numpy",
            "slam_pretrain.cli", "data_pipeline.prepare"):
    try:
        __import__(mod)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{mod} ({type(e).__name__}: {e})")
if missing:
    sys.exit("gpu_check: cannot import " + "; ".join(missing) + " (set SLAM_PYTHON to a python with the "
             "project installed: pip install -c constraints.txt -e .)")
import torch
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (torch %s); use --dry-run on a CPU" % torch.__version__)
    print(f"[gpu_check] torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
else:
    print(f"[gpu_check] torch {torch.__version__}, CPU dry run")
EOF
if [ "$DRY" = 0 ] && [ "$NPROC" -gt "$("$SLAM_PYTHON" -c 'import torch; print(torch.cuda.device_count())')" ]; then
  echo "gpu_check: GPU_CHECK_NPROC=$NPROC is more than the GPUs visible" >&2; exit 2
fi

# -- settings shared by prepare, the bare loop and every trainer run ------------------------------
DATA="$WORK/data"
SEQ="$("$SLAM_PYTHON" -c 'import sys; from slam_pretrain.config import load_config; print(load_config(sys.argv[1]).data.seq_len)' "$CONFIG")"
GLOBAL=$((MICRO * NPROC))
COMMON=(
  "data.dataset_dir=$DATA/dataset" "data.tokenizer=$DATA/corpus/tokenizer.json"
  "data.sources=[{path: $DATA/corpus/corpus.jsonl, text_field: text}]"
  data.val_fraction=0.05 data.shard_size_mb=8 data.verify_shards=size "${EXTRA_DATA[@]}"
  "train.micro_batch_size=$MICRO" "train.global_batch_size=$GLOBAL" "train.max_steps=$STEPS"
  "train.log_interval=$LOG_INTERVAL" train.eval_interval=0 train.eval_batches=1
  "engine.precision=$PRECISION" engine.activation_checkpointing=ef_cycles "engine.device=$DEVICE"
  checkpoint.interval=0 tracking.enabled=false
  "${USER_SETS[@]}"
)
SETS=()
for s in "${COMMON[@]}"; do SETS+=(--set "$s"); done

# -- 1. synthetic dataset ------------------------------------------------------------------------
ROWS=$((STEPS * GLOBAL + GLOBAL))
log "1. synthetic dataset: $ROWS training rows of $SEQ tokens"
"${HELPER[@]}" corpus --config "$CONFIG" "${SETS[@]}" --out "$DATA/corpus" --rows "$ROWS" \
  --doc-words $((SEQ * 2 < 2000 ? SEQ * 2 : 2000)) 2>&1 | tee "$RESULTS/prepare.log"
"$SLAM_PYTHON" -m slam_pretrain prepare --config "$CONFIG" "${SETS[@]}" 2>&1 | tee -a "$RESULTS/prepare.log" | tail -n 5

# Compile modes not run: every run of them is listed as skipped, with the reason.
RUNS=()
SKIPPED_MODES=()
for mode in off on; do
  case " $COMPILE_MODES " in *" $mode "*) ;; *)
    SKIPPED_MODES+=("$mode")
    log "compile $mode: skipped: $NO_COMPILE_WHY"
    printf 'bare-%s\t%s\n' "$mode" "$NO_COMPILE_WHY" >>"$RESULTS/skipped.tsv" ;;
  esac
done

# -- 2. bare loop --------------------------------------------------------------------------------
BARE_TIMEOUT=$((RUN_TIMEOUT * 2))
[ "$BARE_TIMEOUT" -le "$(left)" ] || BARE_TIMEOUT="$(left)"
[ "$BARE_TIMEOUT" -ge "$MIN_RUN" ] || BARE_TIMEOUT="$MIN_RUN"
log "2. bare loop, compile: $COMPILE_MODES (limit ${BARE_TIMEOUT}s)"
rc=0
# shellcheck disable=SC2086  # COMPILE_MODES is a list of words
timeout -s KILL "$BARE_TIMEOUT" "${HELPER[@]}" bare --config "$CONFIG" "${SETS[@]}" --device "$DEVICE" \
  --compile $COMPILE_MODES --steps "$STEPS" --warmup "$WARMUP" --timeout "$RUN_TIMEOUT" \
  --json "$RESULTS/bare.json" >"$RESULTS/bare.log" 2>&1 || rc=$?
grep '^bare loop' "$RESULTS/bare.log" || true
[ "$rc" = 0 ] || { log "bare loop exit code $rc; last lines:"; tail -n 15 "$RESULTS/bare.log" | sed 's/^/   | /'; }

# -- 3. the real trainer -------------------------------------------------------------------------
free_port() { "$SLAM_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
run_trainer() {  # ENGINE COMPILE(off|on)
  local engine="$1" compile="$2" name="$1-compile-$2" launcher=torchrun limit extra=()
  RUNS+=("$name")
  limit=$RUN_TIMEOUT
  [ "$compile" = off ] || limit=$((RUN_TIMEOUT * 3 / 2))
  if [ "$(left)" -lt "$MIN_RUN" ]; then
    log "skip $name: $(left)s left of the ${BUDGET}s budget (a run needs ${MIN_RUN}s)"
    printf '%s\tonly %ss left of the time budget (GPU_CHECK_BUDGET_S=%s)\n' "$name" "$(left)" "$BUDGET" >>"$RESULTS/skipped.tsv"
    return 0
  fi
  [ "$limit" -le "$(left)" ] || limit="$(left)"
  local sets=(--set "engine.name=$engine" --set "engine.compile=$([ "$compile" = on ] && echo true || echo false)"
              --set "run.out_dir=$WORK/runs/$name" --set "run.name=gpu-check-$name")
  if [ "$engine" = deepspeed ]; then
    launcher=deepspeed
    sets+=(--set engine.zero_stage=2)
    extra=(env "SLAM_MASTER_PORT=$(free_port)")
  fi
  log "3. $name: launch/local.sh --launcher $launcher --nproc $NPROC (limit ${limit}s)"
  "${HELPER[@]}" trainer --name "$name" --engine "$engine" --compile "$compile" --out-dir "$WORK/runs/$name" \
    --log "$RESULTS/$name.log" --json "$RESULTS/$name.json" --steps "$STEPS" --warmup "$WARMUP" \
    --tokens-per-step $((GLOBAL * SEQ)) --nproc "$NPROC" --timeout "$limit" -- \
    "${extra[@]}" "$REPO/launch/local.sh" --launcher "$launcher" --nproc "$NPROC" \
    --config "$CONFIG" --resume never "${SETS[@]}" "${sets[@]}" || true  # the summary reports it
  cp "$WORK/runs/$name/metrics.jsonl" "$RESULTS/$name.metrics.jsonl" 2>/dev/null || true
}
for compile in $COMPILE_MODES; do
  for engine in $ENGINES; do
    run_trainer "$engine" "$compile"
  done
done
for compile in "${SKIPPED_MODES[@]}"; do
  for engine in $ENGINES; do
    RUNS+=("$engine-compile-$compile")
    printf '%s\t%s\n' "$engine-compile-$compile" "$NO_COMPILE_WHY" >>"$RESULTS/skipped.tsv"
  done
done

# -- 4. summary ----------------------------------------------------------------------------------
rc=0
"${HELPER[@]}" summary --config "$CONFIG" "${SETS[@]}" --results "$RESULTS" --runs "${RUNS[@]}" \
  --bare-modes off on \
  --device "$DEVICE" --nproc "$NPROC" $([ "$DRY" = 1 ] && echo --dry-run) --elapsed "$((SECONDS - T0))" \
  --json "$RESULTS/summary.json" || rc=$?
log "results in $RESULTS (summary.json, per-run logs and metrics)"
exit "$rc"
