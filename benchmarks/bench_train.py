"""Training throughput of the real ``slam-pretrain train`` against a bare PyTorch loop, activation
checkpointing at 4K tokens, and achieved FLOP/s against this machine's matmul peak, all measured in
the same run (CPU, fp32, one process per loop).

1. Throughput. The real CLI (``python -m slam_pretrain train --config configs/tiny_cpu.yaml --set ...``,
   DeepSpeed ZeRO-1 and FSDP2) runs in a subprocess with ``train.log_interval=1``. The baseline is a
   bare loop in a subprocess of this script: the same resolved config, ``SLAMv1LM`` built from the
   same seed, the same loader (``build_loader`` with the run's loader settings: the same batches in
   the same order), the engines' torch AdamW (``build_optimizer``: the same parameter groups,
   ``foreach``), the same micro-batch / grad-accum,
   LR schedule and gradient clipping, timed the same way (data fetch included). Both run with the
   same ``OMP_NUM_THREADS`` / ``torch.set_num_threads``; the first ``--warmup`` steps are skipped.
   The losses of the loops are compared (same model, same batches). The CLI's final eval /
   checkpoint / export come after the last step and are not timed.
   a) Sequential: one process at a time, bare / deepspeed / fsdp in a rotating order, ``--rounds``
      times. tok/s = tokens per step / median ``step_time_s`` (the trainer's from
      ``out_dir/metrics.jsonl``); the ratio is the median over rounds of trainer/bare within a round.
      Also from the wall time between consecutive per-step stdout lines (``loop``: adds callbacks
      and logging) and from the process's CPU time per step (/proc/PID/task/*/schedstat).
      On a shared machine each process meets different background load, so these ratios swing.
   b) Lockstep: the three loops run at the same time but one step at a time, in turn: each is
      SIGSTOPped after its per-step line and the next one resumed. They meet the same background
      load within a second of each other; steps are paired by index and the ratio is the median of
      the per-step CPU-time ratios. CPU time only: a stop may land just inside the next step, which
      would put stopped time into a wall-clock ``step_time_s``.
2. Activation checkpointing (engine.activation_checkpointing none vs ef_cycles) at 4K tokens,
   measured on the engine directly (``build_engine``, DeepSpeed ZeRO-1 fp32) on random tokens, one
   fresh subprocess per configuration; the same model as in 1 but max_seq_len 4096 and EF segments of
   512 tokens overlapping by 128 (11 segments). Memory: the RSS high-water mark
   (``getrusage(RUSAGE_SELF).ru_maxrss``, reset through /proc/self/clear_refs just before the first
   step) minus the RSS at that moment, i.e. everything the steps add (activations, gradients, AdamW
   state, allocator slack); once with glibc's default malloc and once with
   ``MALLOC_MMAP_THRESHOLD_=65536`` (freed blocks return to the OS, so RSS follows live bytes).
   Gradients and AdamW state are the same in both modes (12 bytes/parameter, shown). Step time: the
   default-malloc processes then alternate the two modes step by step (switching
   ``model.cycle_wrapper``, which the engine set and the model reads at every forward).
3. Achieved FLOP/s = ``flops_per_token`` x tokens/s (model FLOPs: recomputation not counted) against
   ``measure_matmul_flops`` (1024^3 fp32 matmul, same thread count) measured between phases; the
   median is the peak.

    .venv/bin/python benchmarks/bench_train.py                 # ~5 min on 2 shared cores
    .venv/bin/python benchmarks/bench_train.py --quick --json out.json   # ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_cpu.yaml"
STEP_LINE = re.compile(r"^step (\d+)/\d+ \| loss ")
RESULT_PREFIX = "BENCH_RESULT "
AC_LAYOUT = ["model.segment_len=512", "model.overlap=128"]
MMAP_THRESHOLD = 65536  # MALLOC_MMAP_THRESHOLD_ of the allocator-slack-free memory runs
TARGET = 0.97  # trainer tok/s / bare-loop tok/s aimed at (issue 12)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the parent and the workers.

def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in [k for k in env if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                 "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]:
        del env[k]  # a world of one on loopback, whatever launched us
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu",
                "PYTHONUNBUFFERED": "1", "SLAM_DIST_TIMEOUT_S": "300"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def _common_overrides(data_dir: Path, steps: int) -> list[str]:
    """Overrides of configs/tiny_cpu.yaml that both loops share (the trainer adds engine/out_dir)."""
    return [f"data.dataset_dir={data_dir}", "data.num_workers=1", f"train.max_steps={steps}",
            "train.log_interval=1", "train.eval_interval=0", "train.eval_batches=1", "checkpoint.interval=0",
            "tracking.enabled=false", "engine.precision=fp32", "engine.device=cpu",
            "engine.activation_checkpointing=none"]


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (VmHWM, ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Worker: the bare PyTorch loop.

def worker_bare(args: argparse.Namespace) -> None:
    import random

    import numpy as np
    import torch

    from data_pipeline.loader import build_loader, loader_kwargs
    from data_pipeline.manifest import load_manifest
    from slam_pretrain.config import load_config
    from slam_pretrain.model import SLAMv1LM
    from slam_pretrain.engine.optim import build_optimizer, lr_at

    torch.set_num_threads(args.threads)
    cfg = load_config(str(CONFIG), args.set)
    t = cfg.train
    ga = t.global_batch_size // t.micro_batch_size
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    torch.manual_seed(cfg.run.seed)
    model = SLAMv1LM(cfg.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, t)  # the engines' AdamW (same groups, foreach): only the framework differs
    manifest = load_manifest(str(Path(cfg.data.dataset_dir) / "manifest.json"))
    loader = build_loader(manifest, rank=0, world_size=1, micro_batch_size=t.micro_batch_size, seed=cfg.run.seed,
                          split="train", **loader_kwargs(cfg.data))
    it = iter(loader)

    def next_batch() -> dict[str, torch.Tensor]:
        nonlocal it
        try:
            return next(it)
        except StopIteration:  # epoch boundary: the loader moves on to the next epoch's order
            it = iter(loader)
            return next(it)

    for step in range(t.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, t)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for _ in range(ga):
            batch = next_batch()
            _, loss = model(batch["input_ids"], batch["labels"])
            (loss / ga).backward()
            loss_sum += loss.detach().double()
        gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip, foreach=True) if t.grad_clip > 0 else None
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_val = loss_sum.item() / ga
        dt = time.perf_counter() - t0
        print(f"step {step + 1}/{t.max_steps} | loss {loss_val:.6f} | "
              f"gnorm {float(gnorm) if gnorm is not None else float('nan'):.4f} | "
              + RESULT_PREFIX + json.dumps({"step": step + 1, "loss": loss_val, "step_time_s": dt}), flush=True)


# ---------------------------------------------------------------------------------------------
# Worker: one activation-checkpointing configuration on the engine, random tokens.

def worker_ac(args: argparse.Namespace) -> None:
    import random
    import resource

    import numpy as np
    import torch

    from slam_pretrain.config import load_config
    from slam_pretrain.distributed import destroy, init_distributed
    from slam_pretrain.engine import build_engine
    from slam_pretrain.model import SLAMv1LM

    torch.set_num_threads(args.threads)
    n = args.seq_len
    cfg = load_config(str(CONFIG), [
        f"model.max_seq_len={n}", f"data.seq_len={n}", *AC_LAYOUT, "train.micro_batch_size=1",
        "train.global_batch_size=1", "train.grad_clip=1.0", f"engine.activation_checkpointing={args.mode}",
        f"engine.name={args.engine}", "engine.zero_stage=1", "engine.precision=fp32", "engine.device=cpu",
        "tracking.enabled=false", f"run.out_dir={args.out_dir}"])
    dist_info = init_distributed("cpu")
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed % 2**32)
    torch.manual_seed(cfg.run.seed)
    model = SLAMv1LM(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    engine = build_engine(cfg, model, dist_info)
    engine.train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, n + 1), generator=g)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    import gc

    gc.collect()
    rss0 = _rss_kb()
    reset = _reset_peak_rss()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, peaks, losses = [], [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = engine.forward_backward(inputs, labels)
        engine.optimizer_step(1e-4)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # Timing: after the memory steps, alternate the two modes step by step in this process (the engine
    # reads model.cycle_wrapper at every forward, so switching it between steps switches the mode).
    from slam_pretrain.engine.activation_checkpointing import checkpoint_wrapper

    model_ = getattr(engine, "model", None)
    wrappers = {"none": None, "ef_cycles": checkpoint_wrapper}
    pair_times: dict[str, list[float]] = {"none": [], "ef_cycles": []}
    for i in range(args.pairs if model_ is not None else 0):
        for mode in (("none", "ef_cycles") if i % 2 == 0 else ("ef_cycles", "none")):
            model_.cycle_wrapper = wrappers[mode]
            t0 = time.perf_counter()
            engine.forward_backward(inputs, labels)
            engine.optimizer_step(1e-4)
            pair_times[mode].append(time.perf_counter() - t0)
    out = {"mode": args.mode, "engine": args.engine, "seq_len": n, "params": n_params, "rss_before_kb": rss0,
           "maxrss_at_start_kb": maxrss0, "hwm_reset": reset, "maxrss_after_step_kb": peaks,
           "step_time_s": times, "pair_times_s": pair_times, "losses": losses,
           "segments": list(cfg.model.segment_layout(n))}
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    destroy()


# ---------------------------------------------------------------------------------------------
# Parent: running and reading the subprocesses.

def _cpu_s(pid: int) -> float:
    """CPU time (s) of all live threads of process ``pid``, from /proc/PID/task/*/schedstat (ns)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended
    return total / 1e9


def _run_streaming(cmd: list[str], env: dict[str, str], timeout: float
                   ) -> tuple[int, list[str], dict[int, tuple[float, float]]]:
    """Run ``cmd``; return (exit code, output lines, {step: (arrival time of its per-step line, the
    process's CPU time then)})."""
    arrivals: dict[int, tuple[float, float]] = {}
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    watchdog = threading.Timer(timeout, kill)  # a silent hang must not block the benchmark
    watchdog.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            now = time.perf_counter()
            lines.append(line.rstrip("\n"))
            m = STEP_LINE.match(line)
            if m and int(m.group(1)) not in arrivals:
                arrivals[int(m.group(1))] = (now, _cpu_s(proc.pid))
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        watchdog.cancel()
    if killed.is_set():
        lines.append(f"(killed after {timeout:.0f} s)")
    return rc, lines, arrivals


def _fail(what: str, rc: int, lines: list[str]) -> None:
    tail = "\n".join(lines[-30:])
    raise SystemExit(f"bench_train: {what} failed (exit {rc}); last output:\n{tail}")


def _loop_intervals(arrivals: dict[int, tuple[float, float]], warmup: int, steps: int, which: int) -> list[float]:
    """Per-step intervals after the warm-up: which=0 wall time, which=1 CPU time of the process."""
    return [arrivals[k][which] - arrivals[k - 1][which] for k in range(warmup + 1, steps + 1)
            if k in arrivals and k - 1 in arrivals]


def _trainer_cmd(engine: str, data_dir: Path, out_dir: Path, steps: int) -> list[str]:
    sets = _common_overrides(data_dir, steps) + [f"engine.name={engine}", "engine.zero_stage=1",
                                                 f"run.out_dir={out_dir}"]
    cmd = [sys.executable, "-m", "slam_pretrain", "train", "--config", str(CONFIG), "--resume", "never"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _bare_cmd(data_dir: Path, steps: int, threads: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_bare", "--threads", str(threads)]
    for s in _common_overrides(data_dir, steps):
        cmd += ["--set", s]
    return cmd


def run_trainer(engine: str, data_dir: Path, out_dir: Path, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    cmd = _trainer_cmd(engine, data_dir, out_dir, steps)
    t0 = time.perf_counter()
    rc, lines, arrivals = _run_streaming(cmd, _env(threads), timeout=600)
    wall = time.perf_counter() - t0
    if rc != 0:
        _fail(f"slam-pretrain train ({engine})", rc, lines)
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if r.get("split") != "val"]
    by_step = {r["step"]: r for r in recs}
    missing = [k for k in range(1, steps + 1) if k not in by_step]
    if missing:
        raise SystemExit(f"bench_train: metrics.jsonl of the {engine} run lacks steps {missing[:5]}")
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints and export: not needed
    return {"step_time_s": [by_step[k]["step_time_s"] for k in range(1, steps + 1)],
            "data_wait_s": [by_step[k]["data_wait_s"] for k in range(1, steps + 1)],
            "loss": [by_step[k]["loss"] for k in range(1, steps + 1)],
            "loop_s": _loop_intervals(arrivals, warmup, steps, 0),
            "cpu_s": _loop_intervals(arrivals, warmup, steps, 1), "process_wall_s": wall}


def run_bare(data_dir: Path, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    cmd = _bare_cmd(data_dir, steps, threads)
    t0 = time.perf_counter()
    rc, lines, arrivals = _run_streaming(cmd, _env(threads), timeout=600)
    wall = time.perf_counter() - t0
    if rc != 0:
        _fail("bare loop", rc, lines)
    recs = [json.loads(x.split(RESULT_PREFIX, 1)[1]) for x in lines if RESULT_PREFIX in x]
    return {"step_time_s": [r["step_time_s"] for r in recs], "loss": [r["loss"] for r in recs],
            "loop_s": _loop_intervals(arrivals, warmup, steps, 0),
            "cpu_s": _loop_intervals(arrivals, warmup, steps, 1), "process_wall_s": wall}


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _stop(proc: subprocess.Popen) -> None:
    """SIGSTOP ``proc`` and wait until it is stopped (so its CPU time no longer moves)."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    while _proc_state(proc.pid) not in ("T", "t", "Z", "X", "?") and time.monotonic() < deadline:
        time.sleep(0.0002)


def run_lockstep(data_dir: Path, work: Path, steps: int, warmup: int, threads: int, r: int) -> dict[str, Any]:
    """Run the bare loop and both trainers at once but one step at a time, in turn.

    Each process is SIGSTOPped after its per-step line; then the next one is resumed for one step.
    So the three loops meet the same background load within a second of each other, and per-step
    figures can be paired. Only CPU time is used (/proc schedstat, from stop to stop: one whole
    loop iteration): a stop may land inside the next step, which would distort wall-clock step times.
    """
    names = _rotate(["bare", "deepspeed", "fsdp"], r)
    cmds = {"bare": _bare_cmd(data_dir, steps, threads)}
    for e in ("deepspeed", "fsdp"):
        cmds[e] = _trainer_cmd(e, data_dir, work / f"lockstep_{e}_{r}", steps)
    events: "queue.Queue[tuple[str, int, float]]" = queue.Queue()
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, list[str]] = {n: [] for n in names}

    def reader(name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            logs[name].append(line.rstrip("\n"))
            m = STEP_LINE.match(line)
            if m:
                events.put((name, int(m.group(1)), time.perf_counter()))
        events.put((name, -1, time.perf_counter()))  # end of output

    seen: dict[str, int] = {n: 0 for n in names}

    def wait_step(name: str, k: int, timeout: float = 300.0) -> float:
        deadline = time.monotonic() + timeout
        while seen[name] < k:
            try:
                who, step, t = events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"bench_train: lockstep {name} did not reach step {k} within {timeout:.0f} s; "
                                 "last output:\n" + "\n".join(logs[name][-20:])) from None
            if step < 0:
                if seen[who] < steps:
                    raise SystemExit(f"bench_train: lockstep {who} ended early; last output:\n"
                                     + "\n".join(logs[who][-30:]))
                continue
            seen[who] = max(seen[who], step)
            if who == name and step == k:
                return t
            if who != name and step == 1:  # another process reached its first step: hold it there
                _stop(procs[who])
        return time.perf_counter()

    cpu: dict[str, dict[int, float]] = {n: {} for n in names}
    try:
        for n in names:  # start-up runs in parallel; each process is held after its first step
            procs[n] = subprocess.Popen(cmds[n], cwd=REPO, env=_env(threads), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
            threading.Thread(target=reader, args=(n, procs[n]), daemon=True).start()
        for n in names:
            wait_step(n, 1, timeout=600)
            _stop(procs[n])
        for n in names:
            cpu[n][1] = _cpu_s(procs[n].pid)
        for k in range(2, steps + 1):
            for n in _rotate(names, k):
                procs[n].send_signal(signal.SIGCONT)
                wait_step(n, k)
                _stop(procs[n])
                cpu[n][k] = _cpu_s(procs[n].pid)
        for n in names:
            procs[n].send_signal(signal.SIGCONT)
        for n in names:
            rc = procs[n].wait(timeout=600)
            if rc != 0:
                _fail(f"lockstep {n}", rc, logs[n])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        for e in ("deepspeed", "fsdp"):
            shutil.rmtree(work / f"lockstep_{e}_{r}", ignore_errors=True)
    return {n: {"cpu_s": [cpu[n][k] - cpu[n][k - 1] for k in range(max(2, warmup + 1), steps + 1)]}
            for n in names}


def run_ac(mode: str, engine: str, seq_len: int, steps: int, threads: int, out_dir: Path,
           mmap_threshold: Optional[int] = None, pairs: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_ac", "--mode", mode, "--engine", engine,
           "--seq-len", str(seq_len), "--steps", str(steps), "--threads", str(threads), "--out-dir", str(out_dir),
           "--pairs", str(pairs)]
    env = _env(threads)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    rc, lines, _ = _run_streaming(cmd, env, timeout=600)
    if rc != 0:
        _fail(f"activation checkpointing worker ({mode})", rc, lines)
    res = [json.loads(x[len(RESULT_PREFIX):]) for x in lines if x.startswith(RESULT_PREFIX)]
    if not res:
        _fail(f"activation checkpointing worker ({mode}) printed no result", rc, lines)
    return res[0]


def measure_peak(threads: int, seconds: float) -> float:
    import torch

    from slam_pretrain.training.metrics import measure_matmul_flops

    torch.set_num_threads(threads)
    return measure_matmul_flops(torch.device("cpu"), "fp32", n=1024, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# Parent: the benchmark.

def _rotate(xs: list[str], r: int) -> list[str]:
    r %= len(xs)
    return xs[r:] + xs[:r]


def main_bench(args: argparse.Namespace) -> int:
    os.environ["DS_ACCELERATOR"] = "cpu"
    sys.path.insert(0, str(REPO / "tests"))
    from data_assets import build_tiny_dataset
    from slam_pretrain.config import load_config
    from slam_pretrain.model import count_params, flops_per_token

    quick = args.quick
    steps = args.steps or (12 if quick else 25)
    warmup = args.warmup if args.warmup is not None else (3 if quick else 5)
    rounds = args.rounds or (1 if quick else 3)
    ac_steps = args.ac_steps or (3 if quick else 4)
    ac_rounds = args.ac_rounds or 1
    ac_pairs = args.ac_pairs or (2 if quick else 3)
    lock_rounds = args.lockstep_rounds if args.lockstep_rounds is not None else (1 if quick else 2)
    if steps <= warmup + 1:
        raise SystemExit("--steps must exceed --warmup + 1")
    t_start = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data_dir = build_tiny_dataset(work / "data128", seq_len=128, vocab_size=2048).parent
        cfg = load_config(str(CONFIG), _common_overrides(data_dir, steps))
        m, t = cfg.model, cfg.train
        seq = cfg.data.seq_len
        tokens_per_step = t.global_batch_size * seq
        fpt = flops_per_token(m, seq)
        print(f"bench_train: configs/tiny_cpu.yaml model ({count_params(m) / 1e6:.2f}M params, d_model {m.d_model}, "
              f"{2 + 2 * m.ef_cycles} blocks), seq {seq}, micro {t.micro_batch_size} x grad_accum "
              f"{t.global_batch_size // t.micro_batch_size} = {tokens_per_step} tokens/step, fp32 CPU, "
              f"{args.threads} thread(s)/process; {steps} steps/run, first {warmup} skipped, {rounds} round(s)",
              flush=True)

        # -- 1. throughput, interleaved ---------------------------------------------------
        names = ["bare", "deepspeed", "fsdp"]
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
        peaks: list[float] = []
        for r in range(rounds):
            peaks.append(measure_peak(args.threads, 1.0))
            for name in _rotate(names, r):
                if name == "bare":
                    res = run_bare(data_dir, steps, warmup, args.threads)
                else:
                    res = run_trainer(name, data_dir, work / f"run_{name}_{r}", steps, warmup, args.threads)
                runs[name].append(res)
                st = _median(res["step_time_s"][warmup:])
                print(f"  round {r + 1}/{rounds} {name:9s}: median step {1000 * st:6.1f} ms "
                      f"({tokens_per_step / st:,.0f} tok/s), CPU/step {1000 * _median(res['cpu_s']):6.1f} ms, "
                      f"process {res['process_wall_s']:.1f} s", flush=True)

        lockstep: list[dict[str, Any]] = []
        for r in range(lock_rounds):
            res = run_lockstep(data_dir, work, steps, warmup, args.threads, r)
            lockstep.append(res)
            print(f"  lockstep {r + 1}/{lock_rounds}: median CPU/step " + ", ".join(
                f"{n} {1000 * _median(res[n]['cpu_s']):.1f} ms" for n in names), flush=True)

        # -- 2. activation checkpointing at 4K ------------------------------------------
        ac_modes = ["none", "ef_cycles"]
        ac_runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ac_modes}
        ac_mmap: dict[str, list[dict[str, Any]]] = {k: [] for k in ac_modes}
        # Rounds with glibc's default malloc (time and memory as a run sees them), then one with a
        # fixed mmap threshold (memory only: freed blocks go back to the OS, RSS follows live bytes).
        # The default-malloc processes then time both modes alternately (ac_pairs pairs each).
        plan = [] if args.no_ac else [(r, None) for r in range(ac_rounds)] + [(ac_rounds, MMAP_THRESHOLD)]
        for r, thr in plan:
            peaks.append(measure_peak(args.threads, 1.0))
            for mode in _rotate(ac_modes, r):
                res = run_ac(mode, args.ac_engine, args.ac_seq_len, ac_steps, args.threads, work / f"ac_{mode}_{r}",
                             mmap_threshold=thr, pairs=ac_pairs if thr is None else 0)
                (ac_runs if thr is None else ac_mmap)[mode].append(res)
                pt = res["pair_times_s"]
                timing = "" if not pt["none"] else (
                    f", alternating steps: none {1000 * _median(pt['none']):.0f} ms, "
                    f"ef_cycles {1000 * _median(pt['ef_cycles']):.0f} ms")
                print(f"  AC {'malloc default' if thr is None else f'mmap>={thr // 1024}K':14s} {mode:9s}: peak RSS +"
                      f"{(res['maxrss_after_step_kb'][-1] - res['rss_before_kb']) / 1024:.0f} MiB over {ac_steps} "
                      f"steps{timing}", flush=True)
        peaks.append(measure_peak(args.threads, 1.0))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    # -- figures ----------------------------------------------------------------------------
    peak = _median(peaks)
    res_json: dict[str, Any] = {
        "config": {"threads": args.threads, "steps": steps, "warmup": warmup, "rounds": rounds,
                   "tokens_per_step": tokens_per_step, "seq_len": seq, "micro_batch_size": t.micro_batch_size,
                   "grad_accum": t.global_batch_size // t.micro_batch_size, "params": count_params(m),
                   "flops_per_token": fpt, "quick": quick},
        "matmul_peak_flops": peaks, "throughput_runs": runs, "lockstep_runs": lockstep, "ac_runs": ac_runs,
        "ac_runs_mmap": ac_mmap}

    def tok_s(run: dict[str, Any], key: str = "step_time_s") -> float:
        xs = run[key][warmup:] if key == "step_time_s" else run[key]  # loop_s / cpu_s: already past warm-up
        return tokens_per_step / _median(xs)

    summary: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {}
        for key, tag in (("step_time_s", ""), ("loop_s", "loop_"), ("cpu_s", "cpu_")):
            ts = [tok_s(x, key) for x in runs[name]]
            ratios = [tok_s(x, key) / tok_s(bx, key) for x, bx in zip(runs[name], runs["bare"])]
            entry.update({f"{tag}tokens_per_s": _median(ts), f"{tag}tokens_per_s_runs": ts,
                          f"{tag}ratio_vs_bare": _median(ratios), f"{tag}ratio_runs": ratios})
        entry["achieved_flops"] = entry["tokens_per_s"] * fpt
        entry["fraction_of_matmul_peak"] = entry["achieved_flops"] / peak
        if name != "bare":
            dl = [max(abs(a - b) for a, b in zip(x["loss"], bx["loss"])) for x, bx in zip(runs[name], runs["bare"])]
            entry["max_abs_loss_diff_vs_bare"] = max(dl)
        if lockstep:
            paired = [[b / x for b, x in zip(rd["bare"]["cpu_s"], rd[name]["cpu_s"])] for rd in lockstep]
            entry["lockstep_cpu_tokens_per_s"] = tokens_per_step / _median(
                [x for rd in lockstep for x in rd[name]["cpu_s"]])
            entry["lockstep_ratio_vs_bare"] = _median([x for pr in paired for x in pr])
            entry["lockstep_ratio_runs"] = [_median(pr) for pr in paired]
        summary[name] = entry

    W = 104
    labels = {"bare": "bare PyTorch loop", "deepspeed": "trainer DeepSpeed Z1", "fsdp": "trainer FSDP2"}
    print()
    print("=" * W)
    print(f"1. Tokens/s, real `slam-pretrain train` vs bare PyTorch loop (same model, loader, AdamW; "
          f"{args.threads} thread(s))")
    print(f"a) One process at a time, {rounds} round(s) in rotating order. tok/s = tokens/step / median step_time_s "
          f"over steps {warmup + 1}..{steps}")
    print("   (trainer: its metrics.jsonl). 'vs bare' = median over rounds of trainer/bare within a round. "
          "'loop vs bare': the same from")
    print("   the wall time between consecutive per-step stdout lines (adds callbacks/logging). 'CPU vs bare': from "
          "the CPU time of")
    print("   the process per step (/proc schedstat, all threads; time taken by other tenants does not count).")
    print("-" * W)
    print(f"{'':<21}{'tok/s':>8}{'vs bare':>8}  {'per round':<21}{'loop vs':>8}{'CPU vs':>8}{'GFLOP/s':>9}"
          f"{'of matmul':>10}")
    print(f"{'':<21}{'':>8}{'':>8}  {'':<21}{'bare':>8}{'bare':>8}{'':>9}{'peak':>10}")
    for name in names:
        e = summary[name]
        per = "(" + ", ".join(f"{x:.3f}" for x in e["ratio_runs"]) + ")"
        print(f"{labels[name]:<21}{e['tokens_per_s']:>8,.0f}{e['ratio_vs_bare']:>8.3f}  {per:<21}"
              f"{e['loop_ratio_vs_bare']:>8.3f}{e['cpu_ratio_vs_bare']:>8.3f}"
              f"{e['achieved_flops'] / 1e9:>9.2f}{e['fraction_of_matmul_peak']:>10.1%}")
    if lockstep:
        print("-" * W)
        print(f"b) Lockstep, {len(lockstep)} round(s): the three loops run at once but one step at a time in turn "
              f"(SIGSTOP/SIGCONT), so")
        print("   they meet the same background load; CPU time per loop iteration, steps paired by index: "
              "'vs bare' = median over")
        print("   all paired steps of bare CPU / trainer CPU (wall step times are not used here: a stop can land "
              "inside a step).")
        print(f"{'':<21}{'CPU tok/s':>10}{'vs bare':>8}  {'per round':<21}")
        for name in names:
            e = summary[name]
            per = "(" + ", ".join(f"{x:.3f}" for x in e["lockstep_ratio_runs"]) + ")"
            print(f"{labels[name]:<21}{e['lockstep_cpu_tokens_per_s']:>10,.0f}{e['lockstep_ratio_vs_bare']:>8.3f}"
                  f"  {per:<21}")
    for name in ("deepspeed", "fsdp"):
        print(f"   {labels[name]}: max |loss - bare loss| over all steps = "
              f"{summary[name]['max_abs_loss_diff_vs_bare']:.2e} (same model, same batches)")
    verdict = {n: summary[n]["ratio_vs_bare"] >= TARGET for n in ("deepspeed", "fsdp")}
    if lockstep:
        print("   (a) moves with the load each process happens to meet (see the per-round spread); (b) compares steps "
              "taken within")
        print("   about a second of each other and is the figure to trust on a shared machine.")
    print(f"   target tok/s >= {TARGET} x bare (a): " + ", ".join(f"{labels[n]} {'MET' if ok else 'NOT MET'}"
                                                              for n, ok in verdict.items())
          + ("" if not lockstep else "; (b): " + ", ".join(
              f"{labels[n]} {'MET' if summary[n]['lockstep_ratio_vs_bare'] >= TARGET else 'NOT MET'}"
              for n in ("deepspeed", "fsdp"))))

    # -- activation checkpointing -----------------------------------------------------------
    if args.no_ac:
        ac_runs["none"] = []
    if not ac_runs["none"]:  # --no-ac: section 2 was not measured
        print("=" * W)
        wall = time.perf_counter() - t_start
        print(f"3. Matmul peak (1024^3 fp32, {args.threads} thread(s)): median {peak / 1e9:.2f} GFLOP/s; "
              f"wall time {wall:.0f} s")
        res_json.update({"summary": summary, "matmul_peak_median": peak, "wall_s": wall})
        if args.json:
            Path(args.json).write_text(json.dumps(res_json, indent=1))
            print(f"wrote {args.json}")
        return 0
    ac0 = ac_runs["none"][0]
    n_params = ac0["params"]
    ac_fpt = flops_per_token(load_config(str(CONFIG), [f"model.max_seq_len={args.ac_seq_len}",
                                                       f"data.seq_len={args.ac_seq_len}", *AC_LAYOUT]).model,
                             args.ac_seq_len)
    print("=" * W)
    s_len, s_ov = ac0["segments"]
    print(f"2. Activation checkpointing per EF cycle at {args.ac_seq_len} tokens (engine {args.ac_engine} ZeRO-1 "
          f"fp32, build_engine in-process on random tokens, batch 1 x {args.ac_seq_len}, EF segments "
          f"{s_len}/{s_ov})")
    print(f"   memory = peak RSS (ru_maxrss, reset before step 1) - RSS before step 1, fresh process per run, "
          f"max over {ac_steps} steps:")
    print(f"   'malloc' with glibc defaults ({ac_rounds} process(es) per mode, median), 'mmap' with "
          f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (RSS ~ live bytes).")
    print(f"   Step time: afterwards each 'malloc' process alternates the two modes step by step ({ac_pairs} pairs); "
          f"median over all steps,")
    print("   'vs none' = median over pairs of the step-time ratio.")
    print("-" * W)
    print(f"{'act. checkpointing':<19}{'malloc MiB':>11}{'vs none':>8}{'mmap MiB':>9}{'vs none':>8}{'step ms':>9}"
          f"{'vs none':>8}{'tok/s':>7}{'GFLOP/s':>9}{'of peak':>9}")
    ac_sum: dict[str, Any] = {}

    def delta_mib(x: dict[str, Any]) -> float:
        return (x["maxrss_after_step_kb"][-1] - x["rss_before_kb"]) / 1024

    for mode in ac_modes:
        mem = [delta_mib(x) for x in ac_runs[mode]]
        mem_mmap = [delta_mib(x) for x in ac_mmap[mode]]
        st = [t_ for x in ac_runs["none"] + ac_runs["ef_cycles"] for t_ in x["pair_times_s"][mode]]
        ac_sum[mode] = {"peak_delta_mib": _median(mem), "peak_delta_mib_runs": mem,
                        "peak_delta_mib_mmap": _median(mem_mmap), "step_time_s": _median(st), "step_time_s_all": st}
    pair_ratios = [e_ / n_ for x in ac_runs["none"] + ac_runs["ef_cycles"]
                   for n_, e_ in zip(x["pair_times_s"]["none"], x["pair_times_s"]["ef_cycles"])]
    for mode in ac_modes:
        a, b = ac_sum[mode], ac_sum["none"]
        tps = args.ac_seq_len / a["step_time_s"]
        a.update({"mem_ratio_vs_none": a["peak_delta_mib"] / b["peak_delta_mib"],
                  "mem_ratio_vs_none_mmap": a["peak_delta_mib_mmap"] / b["peak_delta_mib_mmap"],
                  "time_ratio_vs_none": 1.0 if mode == "none" else _median(pair_ratios),
                  "time_ratio_pairs": None if mode == "none" else pair_ratios, "tokens_per_s": tps,
                  "achieved_flops": tps * ac_fpt, "fraction_of_matmul_peak": tps * ac_fpt / peak})
        print(f"{mode:<19}{a['peak_delta_mib']:>11.0f}{a['mem_ratio_vs_none']:>8.2f}{a['peak_delta_mib_mmap']:>9.0f}"
              f"{a['mem_ratio_vs_none_mmap']:>8.2f}{1000 * a['step_time_s']:>9.0f}{a['time_ratio_vs_none']:>8.2f}"
              f"{tps:>7,.0f}{tps * ac_fpt / 1e9:>9.2f}{tps * ac_fpt / peak:>8.1%}")
    print(f"   of which gradients + AdamW state (same in both): 12 B x {n_params / 1e6:.2f}M params = "
          f"{12 * n_params / 2**20:.0f} MiB; model FLOPs only (recomputation not counted)")

    # -- peak ---------------------------------------------------------------------------------
    print("=" * W)
    print(f"3. Matmul peak (1024^3 fp32, {args.threads} thread(s)): median {peak / 1e9:.2f} GFLOP/s over "
          f"{len(peaks)} measurements (" + ", ".join(f"{p / 1e9:.1f}" for p in peaks) + ")")
    print(f"   flops_per_token: {fpt:,.0f} at seq {seq}; {ac_fpt:,.0f} at seq {args.ac_seq_len}")
    wall = time.perf_counter() - t_start
    print(f"   wall time {wall:.0f} s")
    print("=" * W)
    res_json.update({"summary": summary, "ac_summary": ac_sum, "matmul_peak_median": peak, "wall_s": wall,
                     "ac_flops_per_token": ac_fpt})
    if args.json:
        Path(args.json).write_text(json.dumps(res_json, indent=1))
        print(f"wrote {args.json}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_bare", "_ac"):
        p = argparse.ArgumentParser(prog=f"bench_train.py {argv[0]}")
        p.add_argument("--threads", type=int, required=True)
        p.add_argument("--set", action="append", default=[])
        p.add_argument("--mode", default="none")
        p.add_argument("--engine", default="deepspeed")
        p.add_argument("--seq-len", type=int, default=4096)
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--out-dir", default="")
        p.add_argument("--pairs", type=int, default=0)
        wargs = p.parse_args(argv[1:])
        (worker_bare if argv[0] == "_bare" else worker_ac)(wargs)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds (~2 min)")
    p.add_argument("--json", metavar="OUT", help="write every measurement and the summary here")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per process (default 1)")
    p.add_argument("--steps", type=int, default=0, help="steps per throughput run (default 25, quick 12)")
    p.add_argument("--warmup", type=int, default=None, help="steps skipped per run (default 5, quick 3)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, quick 1)")
    p.add_argument("--lockstep-rounds", type=int, default=None,
                   help="lockstep rounds (all three loops at once, one step each in turn; default 2, quick 1, 0 = off)")
    p.add_argument("--ac-seq-len", type=int, default=4096)
    p.add_argument("--ac-steps", type=int, default=0, help="memory steps per AC process (default 4, quick 3)")
    p.add_argument("--ac-rounds", type=int, default=0, help="default-malloc AC processes per mode (default 1)")
    p.add_argument("--ac-pairs", type=int, default=0,
                   help="alternating none/ef_cycles step pairs timed per default-malloc AC process (default 3, quick 2)")
    p.add_argument("--ac-engine", default="deepspeed", choices=["deepspeed", "fsdp"])
    p.add_argument("--no-ac", action="store_true", help="skip section 2 (activation checkpointing at 4K)")
    p.add_argument("--workdir", help="keep datasets and runs here (default: a temporary directory, removed)")
    return main_bench(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
