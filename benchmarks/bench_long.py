"""Long context: SLAM v1 against a same-depth dense model, context parallelism, document masking.

Forward + backward (fp32 on CPU unless --device/--dtype say otherwise) of one row of N tokens:

- slam:        a small SLAM v1 (fixed EF segments, default S=320, O=64, so the stride T = S - O =
               256): EF attention is O(N * S);
- same-depth:  the same model with one segment spanning the sequence (segment_len = N, overlap 0):
               the same blocks on a token's path, all full attention;
- slam CP=K:   SLAM split over K context-parallel ranks (``engine.context_parallel``: K processes,
               gloo on CPU, NCCL on K GPUs), each computing 2 chunks of N / 2K tokens: the full
               blocks all-gather keys/values, the EF cycles exchange only O-token halos;
- doc masking: SLAM with ``model.doc_masking: true`` (and with position reset) at --mask-len, on a
               row packed with documents of --doc-len tokens (EOS-delimited, as prepare writes them):
               every attention gets a boolean causal same-document mask (the full blocks [N, N],
               each EF segment [S, S]) instead of the fused is_causal kernel.

Per run it reports step time, tokens/s per rank (tokens a rank computes / step time: N for one
process, N / K under CP, as torchtitan counts them) and activation memory per rank: the exact bytes
autograd saves for backward (``saved_activation_bytes``, independent of the allocator and of other
processes), and on CUDA also the step's ``torch.cuda.max_memory_allocated`` peak. Ratios are
against baselines measured in the same run (median of --repeats timed steps after a warm-up), so
they compare like with like on whatever machine runs it: SLAM / same-depth at N; CP=K against
CP=1 at N, and against CP=1 at N / K (the same tokens per rank: the activation memory of 2N on
2 ranks should be close to that of N on one). On the CPU the CP full blocks hand SDPA an explicit
lower-right causal mask per chunk ([C, b], keys [0, b)), which it saves for backward as fp32:
4 C b bytes per chunk and block, growing as N^2, on top of the layout's own cost (CUDA passes a
causal bias without a tensor); the saved bytes printed here include it.

The CP layout needs every N to split into 2K chunks that are multiples of the stride T, i.e. N a
multiple of 2K * T (1024 for K=2, T=256). S=256/O=64 (T=192) does not split 2K-16K, hence the
default S=320 for every model of the run, so the SLAM rows with and without CP are the same model.

    python benchmarks/bench_long.py                              # CPU: 2K-16K, CP=2, masking at 4K: 5.5 min on 2 cores at load 2.5-4
    python benchmarks/bench_long.py --sizes 2K,4K --cp 0 --repeats 5 --json out.json
    python benchmarks/bench_long.py --device cuda --sizes 8K,32K,64K --mask-len 32K --dtype bfloat16 --cp 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from slam_pretrain.engine.activation_checkpointing import saved_activation_bytes
from slam_pretrain.model import ModelConfig, SLAMv1LM
from slam_pretrain.model.sequence_shard import layout_problem

EOS = 3
MIB = 2**20


def parse_size(s: str) -> int:
    s = s.strip().upper()
    return int(float(s[:-1]) * 1024) if s.endswith("K") else int(s)


def size_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def small_config(args: argparse.Namespace, n: int) -> ModelConfig:
    return ModelConfig(vocab_size=4096, max_seq_len=max(n, 16384), d_model=args.d_model, num_heads=args.heads,
                       d_ff=int(args.d_model * 8 / 3) // 64 * 64, ef_cycles=args.ef_cycles,
                       segment_len=args.segment_len, overlap=args.overlap, eos_id=EOS)


def same_depth(cfg: ModelConfig, n: int) -> ModelConfig:
    return dataclasses.replace(cfg, segment_len=n, overlap=0)


def packed_row(n: int, doc_len: int, seed: int = 0) -> torch.Tensor:
    """[1, n] tokens: documents of doc_len tokens, each ending with EOS (as prepare packs them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 4096, (1, n), generator=g)
    x[0, doc_len - 1::doc_len] = EOS
    return x


def build(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> SLAMv1LM:
    torch.manual_seed(0)  # the same weights in every process, so CP ranks hold one model
    return SLAMv1LM(cfg).to(device, getattr(torch, args.dtype)).train()


def measure(model: SLAMv1LM, tokens: torch.Tensor, repeats: int) -> dict:
    """One warm-up step whose saved-for-backward bytes are counted, then ``repeats`` timed steps
    (forward + backward, loss over every position): {"step_s": median, "act_bytes", "peak_bytes"}.
    Under CP every rank of the group must call this with the same arguments (the steps' collectives)."""
    x = tokens.to(next(model.parameters()).device)
    cuda = x.device.type == "cuda"
    # The warm-up step (allocations, plan cache) doubles as the memory count: the hooks cost time,
    # which is why it is not a timed step.
    (_, loss), act = saved_activation_bytes(lambda: model(x, x), model)
    loss.backward()
    model.zero_grad(set_to_none=True)
    del loss
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        del loss
    peak = torch.cuda.max_memory_allocated(x.device) if cuda else None
    return {"step_s": statistics.median(times), "act_bytes": act, "peak_bytes": peak}


def run_one(cfg: ModelConfig, tokens: torch.Tensor, args: argparse.Namespace,
            setup: Optional[Callable[[SLAMv1LM], None]] = None) -> dict:
    model = build(cfg, args, torch.device(args.device))
    if setup is not None:
        setup(model)
    out = measure(model, tokens, args.repeats)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


# -- context parallelism: K processes, one per rank -------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cp_rank(rank: int, k: int, port: int, sizes: list[int], args: argparse.Namespace, out_dir: str) -> None:
    """One rank of the CP=k group (a spawned process): SLAM at every N of ``sizes``."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(k), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(k), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):  # init_distributed would read a SLURM job's rank instead
        os.environ.pop(key, None)
    if args.device == "cpu":
        torch.set_num_threads(1)  # as the CP=1 run: one thread per process, so a rank is a core
    from slam_pretrain.distributed import destroy, init_distributed
    from slam_pretrain.engine.context_parallel import apply_context_parallel, build_mesh

    info = init_distributed(args.device)
    try:
        mesh = build_mesh(info, k)
        results = []
        for n in sizes:
            model = build(small_config(args, n), args, info.device)
            apply_context_parallel(model, mesh)
            results.append(measure(model, packed_row(n, args.doc_len), args.repeats))
            del model
    finally:
        destroy()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def run_context_parallel(k: int, sizes: list[int], args: argparse.Namespace) -> list[dict]:
    """SLAM with CP=k at each N, one spawned process per rank (all sizes in one group, so the
    processes start once). Per N: the slowest rank's step time (the group's step) and the largest
    rank's activation bytes."""
    import torch.multiprocessing as mp

    with TemporaryDirectory(prefix="bench_long_cp_") as tmp:
        mp.spawn(_cp_rank, args=(k, free_port(), sizes, args, tmp), nprocs=k, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(k)]
    out = []
    for i in range(len(sizes)):
        per = [r[i] for r in ranks]
        peaks = [p["peak_bytes"] for p in per if p["peak_bytes"] is not None]
        out.append({"step_s": max(p["step_s"] for p in per), "act_bytes": max(p["act_bytes"] for p in per),
                    "peak_bytes": max(peaks) if peaks else None,
                    "per_rank": per})
    return out


# -- the report -------------------------------------------------------------------------------

def ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def table(rows: list[dict], cuda: bool) -> list[str]:
    """Markdown rows: one per (N, model, CP); ratios against the rows measured in this run."""
    by = {(r["n"], r["model"], r["cp"]): r for r in rows}
    head = ["seq len", "model", "CP", "step s", "tokens/s per rank", "act. MiB per rank"]
    head += ["peak MiB per rank"] if cuda else []
    head += ["tok/s vs dense", "mem vs dense", "tok/s/rank vs CP=1 @N", "mem vs CP=1 @N",
             "tok/s/rank vs CP=1 @N/K", "mem vs CP=1 @N/K"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        n, k = r["n"], r["cp"]
        dense = by.get((n, "same-depth", 1)) if r["model"] == "SLAM" and k == 1 else None
        full = by.get((n, "SLAM", 1)) if k > 1 else None
        part = by.get((n // k, "SLAM", 1)) if k > 1 and n % k == 0 else None
        cells = [size_label(n), r["model"], str(k), f"{r['step_s']:.3f}", f"{r['tok_s_rank']:,.0f}",
                 f"{r['act_bytes'] / MIB:,.1f}"]
        if cuda:
            cells.append(f"{r['peak_bytes'] / MIB:,.0f}" if r["peak_bytes"] is not None else "-")
        cells += [ratio(r["tok_s_rank"], dense and dense["tok_s_rank"]), ratio(r["act_bytes"], dense and dense["act_bytes"]),
                  ratio(r["tok_s_rank"], full and full["tok_s_rank"]), ratio(r["act_bytes"], full and full["act_bytes"]),
                  ratio(r["tok_s_rank"], part and part["tok_s_rank"]), ratio(r["act_bytes"], part and part["act_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def row(n: int, model: str, cp: int, m: dict) -> dict:
    return {"n": n, "model": model, "cp": cp, "step_s": m["step_s"], "tok_s_rank": n / cp / m["step_s"],
            "act_bytes": m["act_bytes"], "peak_bytes": m["peak_bytes"],
            **({"per_rank": m["per_rank"]} if "per_rank" in m else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2K,4K,8K,16K", help="sequence lengths for SLAM vs same-depth dense and CP")
    ap.add_argument("--dense-max", default="8K", help="longest N the same-depth dense model runs at (its cost is N^2)")
    ap.add_argument("--cp", type=int, default=2, help="context-parallel ranks K for the CP rows (0: skip them)")
    ap.add_argument("--mask-len", default="4K", help="N of the document masking comparison")
    ap.add_argument("--doc-len", type=int, default=512, help="tokens per packed document in every row")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ef-cycles", type=int, default=2)
    ap.add_argument("--segment-len", type=int, default=320, help="S (tokens); S - O must split N / 2K under CP")
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per point (after one warm-up step)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="also write the records here")
    args = ap.parse_args()

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    dense_max = parse_size(args.dense_max)
    cuda = args.device == "cuda"
    k = args.cp
    cp_note = None
    if k == 1 or k < 0:
        ap.error(f"--cp {k}: give the number of context-parallel ranks (>= 2), or 0 to skip CP")
    if k and cuda and torch.cuda.device_count() < k:
        cp_note = f"CP={k} skipped: it needs {k} GPUs (one per rank), {torch.cuda.device_count()} visible"
        k = 0
    if k:
        for n in sizes:
            problem = layout_problem(small_config(args, n), n, k)
            if problem:
                ap.error(problem + " (see --segment-len / --overlap)")
    # CP=1 SLAM runs at every N, and at N / K as the reference of the same tokens per rank.
    slam_sizes = sorted(set(sizes) | ({n // k for n in sizes} if k else set()))

    load0 = os.getloadavg()
    wall0 = time.perf_counter()
    print(f"# small SLAM: d_model={args.d_model} heads={args.heads} ef_cycles={args.ef_cycles} "
          f"S={args.segment_len} O={args.overlap}; {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s) per process; fwd+bwd of one row, median of {args.repeats}; "
          f"load average at start {load0[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    rows: list[dict] = []
    for n in slam_sizes:
        cfg = small_config(args, n)
        x = packed_row(n, args.doc_len)
        rows.append(row(n, "SLAM", 1, run_one(cfg, x, args)))
        if n in sizes and n <= dense_max:
            rows.append(row(n, "same-depth", 1, run_one(same_depth(cfg, n), x, args)))
        print(f"  N={size_label(n)} CP=1 done ({time.perf_counter() - wall0:.0f} s)", flush=True)
    if k:
        for n, m in zip(sizes, run_context_parallel(k, sizes, args)):
            rows.append(row(n, "SLAM", k, m))
        print(f"  CP={k} done ({time.perf_counter() - wall0:.0f} s)", flush=True)
    order = {"SLAM": 0, "same-depth": 1}
    rows.sort(key=lambda r: (r["n"], r["cp"] > 1, order[r["model"]]))

    print()
    print("\n".join(table(rows, cuda)))
    print("\nactivation memory: bytes autograd saves for backward (exact, weights excluded)"
          + ("; peak: torch.cuda.max_memory_allocated over the timed steps" if cuda else ""))
    if k and not cuda:
        print(f"CP={k}: {k} gloo processes with 1 thread each on this machine's {os.cpu_count()} CPUs, shared with "
              "each other and any other load: time figures under CP are indicative only; the memory figures are exact")
    if cp_note:
        print(cp_note)
    if k:
        print(f"CP rows: tokens/s per rank = N / {k} / step time (the slowest rank's); @N/K: CP=1 SLAM at N / {k}, "
              "the same tokens per rank")

    n = parse_size(args.mask_len)
    cfg = small_config(args, n)
    x = packed_row(n, args.doc_len)
    off = run_one(cfg, x, args)["step_s"]
    on = run_one(dataclasses.replace(cfg, doc_masking=True), x, args)["step_s"]
    reset = run_one(dataclasses.replace(cfg, doc_masking=True, doc_position_reset=True), x, args)["step_s"]
    print(f"\ndocument masking at N={n} (documents of {args.doc_len} tokens):")
    print(f"  off {off:.3f} s   on {on:.3f} s ({on / off:.2f}x)   on + position reset {reset:.3f} s ({reset / off:.2f}x)")
    mask = {"n": n, "doc_len": args.doc_len, "mask_off_s": off, "mask_on_s": on, "mask_reset_s": reset,
            "mask_ratio": on / off, "mask_reset_ratio": reset / off}
    wall = time.perf_counter() - wall0
    load1 = os.getloadavg()
    print(f"\nwall {wall:.0f} s; load average at end {load1[0]:.2f} (1 min), {load1[1]:.2f} (5 min)")
    if args.json:
        machine = {"device": args.device, "torch": torch.__version__, "cpus": os.cpu_count(),
                   "threads": torch.get_num_threads(), "loadavg_start": load0, "loadavg_end": load1,
                   "gpus": torch.cuda.device_count() if cuda else 0, "cp_note": cp_note}
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "wall_s": wall,
                                               "records": rows, "doc_masking": mask}, indent=1) + "\n")


if __name__ == "__main__":
    main()
