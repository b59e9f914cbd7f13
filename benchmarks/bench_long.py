"""Long-context step time: SLAM v1 against a same-depth dense model, and the cost of document masking.

Forward + backward (fp32 on CPU unless --device/--dtype say otherwise) of one row of N tokens:

- slam:        a small SLAM v1 (fixed EF segments, default S=256, O=64): EF attention is O(N * S);
- same-depth:  the same model with one segment spanning the sequence (segment_len = N, overlap 0):
               the same blocks on a token's path, all full attention;
- doc masking: SLAM with ``model.doc_masking: true`` (and with position reset) at --mask-len, on a
               row packed with documents of --doc-len tokens (EOS-delimited, as prepare writes them):
               every attention gets a boolean causal same-document mask (the full blocks [N, N],
               each EF segment [S, S]) instead of the fused is_causal kernel.

Ratios are against baselines measured in the same run (median of --repeats timed steps after a
warm-up), so they compare like with like on whatever machine runs it.

    python benchmarks/bench_long.py                              # CPU: 2K-16K + masking at 4K, ~2-3 min on 2 cores
    python benchmarks/bench_long.py --sizes 2K,4K --repeats 3 --json out.json
    python benchmarks/bench_long.py --device cuda --sizes 8K,32K,64K --mask-len 32K --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from slam_pretrain.model import ModelConfig, SLAMv1LM

EOS = 3


def parse_size(s: str) -> int:
    s = s.strip().upper()
    return int(float(s[:-1]) * 1024) if s.endswith("K") else int(s)


def small_config(args: argparse.Namespace, n: int) -> ModelConfig:
    return ModelConfig(vocab_size=4096, max_seq_len=max(n, 16384), d_model=args.d_model, num_heads=args.heads,
                       d_ff=int(args.d_model * 8 / 3) // 64 * 64, ef_cycles=args.ef_cycles,
                       segment_len=args.segment_len, overlap=args.overlap, eos_id=EOS)


def packed_row(n: int, doc_len: int, seed: int = 0) -> torch.Tensor:
    """[1, n] tokens: documents of doc_len tokens, each ending with EOS (as prepare packs them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, 4096, (1, n), generator=g)
    x[0, doc_len - 1::doc_len] = EOS
    return x


def step_time(cfg: ModelConfig, tokens: torch.Tensor, args: argparse.Namespace) -> float:
    """Median seconds of forward + backward (loss over every position) after one warm-up step."""
    torch.manual_seed(0)
    model = SLAMv1LM(cfg).to(args.device, getattr(torch, args.dtype)).train()
    x = tokens.to(args.device)
    times = []
    for i in range(args.repeats + 1):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up (allocations, plan cache)
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2K,4K,8K,16K", help="sequence lengths for SLAM vs same-depth dense")
    ap.add_argument("--dense-max", default="8K", help="longest N the same-depth dense model runs at (its cost is N^2)")
    ap.add_argument("--mask-len", default="4K", help="N of the document masking comparison")
    ap.add_argument("--doc-len", type=int, default=512, help="tokens per packed document in the masking rows")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ef-cycles", type=int, default=2)
    ap.add_argument("--segment-len", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="also write the records here")
    args = ap.parse_args()

    records = []
    print(f"# small SLAM: d_model={args.d_model} heads={args.heads} ef_cycles={args.ef_cycles} "
          f"S={args.segment_len} O={args.overlap}; {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fwd+bwd of one row, median of {args.repeats}")
    print(f"{'N':>7} {'slam_s':>9} {'dense_s':>9} {'dense/slam':>10} {'slam tok/s':>11}")
    dense_max = parse_size(args.dense_max)
    for n in map(parse_size, args.sizes.split(",")):
        cfg = small_config(args, n)
        x = packed_row(n, args.doc_len)
        slam = step_time(cfg, x, args)
        dense = step_time(dataclasses.replace(cfg, segment_len=n, overlap=0), x, args) if n <= dense_max else None
        records.append({"n": n, "slam_s": slam, "same_depth_dense_s": dense})
        ratio = f"{dense / slam:10.2f}" if dense else f"{'-':>10}"
        print(f"{n:>7} {slam:9.3f} {dense if dense else float('nan'):9.3f} {ratio} {n / slam:11.0f}")

    n = parse_size(args.mask_len)
    cfg = small_config(args, n)
    x = packed_row(n, args.doc_len)
    off = step_time(cfg, x, args)
    on = step_time(dataclasses.replace(cfg, doc_masking=True), x, args)
    reset = step_time(dataclasses.replace(cfg, doc_masking=True, doc_position_reset=True), x, args)
    print(f"\ndocument masking at N={n} (documents of {args.doc_len} tokens):")
    print(f"  off {off:.3f} s   on {on:.3f} s ({on / off:.2f}x)   on + position reset {reset:.3f} s ({reset / off:.2f}x)")
    records.append({"n": n, "doc_len": args.doc_len, "mask_off_s": off, "mask_on_s": on, "mask_reset_s": reset,
                    "mask_ratio": on / off, "mask_reset_ratio": reset / off})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
