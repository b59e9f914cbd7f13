"""Decoding with the exact KV cache against the recompute path, and the cache's size, same run.

1. Decode speed: a small SLAM v1 model is given a context of C tokens (one prefill), then decodes
   new tokens one at a time with the cache (``kv_cache.decode_step``), and, as the baseline, with
   a forward pass over the whole context per token (what ``--no-cache`` does). tokens/s of each
   and their ratio; the logits of the two paths are compared on the first step (max |diff|).
2. Cache size: bytes the cache holds after a prefill of N tokens, measured on the allocated
   tensors (``SLAMCache.nbytes``), next to the analytic figure
   (2 full blocks x N + ef_cycles x 2 blocks x S positions, each 2 x kv_heads x head_dim x bytes)
   and to a same-depth dense model's (ef_cycles + 2 layers x N positions: a standard transformer
   cache, analytic). The EF part does not grow with N.

    python benchmarks/bench_generate.py                       # CPU, ~3 min on 2 cores
    python benchmarks/bench_generate.py --contexts 512,2K --cache-sizes 8K --json out.json
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --contexts 2K,8K,32K
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from slam_pretrain.model.kv_cache import decode_step, prefill
from slam_pretrain.model import ModelConfig, SLAMv1LM


def parse_sizes(text: str) -> list[int]:
    return [int(float(s[:-1]) * 1024) if s.lower().endswith("k") else int(s) for s in text.split(",")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_speed(model: SLAMv1LM, context: int, steps: int, recompute_steps: int, device: torch.device) -> dict:
    """tokens/s of cached decoding and of recomputing, from the same context."""
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (context + steps,), generator=g).tolist()
    # Cached: prefill the context, then decode `steps` tokens (teacher-forced, so both paths see
    # the same tokens); the first step is a warm-up.
    last, cache = prefill(model, [ids[:context]], context + steps)
    first = decode_step(model, cache, torch.tensor([ids[context]], device=device))  # position `context`
    sync(device)
    t0 = time.perf_counter()
    for j in range(1, steps):
        decode_step(model, cache, torch.tensor([ids[context + j]], device=device))
    sync(device)
    cached_s = (time.perf_counter() - t0) / (steps - 1)
    # Recompute: a forward pass over the whole context for each token (the fastest of a few).
    times, ref = [], None
    for j in range(recompute_steps + 1):
        x = torch.tensor([ids[:context + 1 + j]], device=device)
        sync(device)
        t0 = time.perf_counter()
        out = model(x)[0, -1]
        sync(device)
        if j == 0:
            ref = out  # warm-up, and the reference for the first cached step
        else:
            times.append(time.perf_counter() - t0)
    recompute_s = min(times)
    return {"context": context, "cached_tok_s": 1 / cached_s, "recompute_tok_s": 1 / recompute_s,
            "speedup": recompute_s / cached_s, "max_abs_diff": float((first[0].float() - ref.float()).abs().max())}


@torch.no_grad()
def cache_size(cfg: ModelConfig, n: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Measured and analytic cache bytes at context n, and a same-depth dense model's."""
    torch.manual_seed(0)
    model = SLAMv1LM(dataclasses.replace(cfg, max_seq_len=n)).to(device=device, dtype=dtype).eval()
    _, cache = prefill(model, [[1] * n], n)
    per_pos = 2 * cfg.kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8  # k and v
    s, _ = cfg.segment_layout(n)
    analytic = (2 * n + cfg.ef_cycles * 2 * s) * per_pos
    dense = (cfg.ef_cycles + 2) * n * per_pos
    return {"n": n, "measured_bytes": cache.nbytes(), "ef_bytes": cache.nbytes("ef"), "analytic_bytes": analytic,
            "dense_same_depth_bytes": dense, "slam_over_dense": cache.nbytes() / dense}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="512,2K,8K", help="contexts for the decode-speed rows")
    p.add_argument("--cache-sizes", default="8K,32K", help="contexts for the cache-size rows")
    p.add_argument("--steps", type=int, default=33, help="cached decode steps per context (first is warm-up)")
    p.add_argument("--recompute-steps", type=int, default=3, help="timed recompute steps (fastest counts)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ef-cycles", type=int, default=3)
    p.add_argument("--segment-len", type=int, default=256)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    args = p.parse_args()

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    contexts, sizes = parse_sizes(args.contexts), parse_sizes(args.cache_sizes)
    cfg = ModelConfig(vocab_size=2048, max_seq_len=max(contexts) + args.steps, d_model=args.d_model,
                      num_heads=args.heads, num_kv_heads=args.kv_heads, d_ff=int(2.75 * args.d_model),
                      ef_cycles=args.ef_cycles, segment_len=args.segment_len, overlap=args.overlap)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} d_model={cfg.d_model} "
          f"heads={cfg.num_heads} kv_heads={cfg.kv_heads} ef_cycles={cfg.ef_cycles} S={cfg.segment_len} "
          f"O={cfg.overlap} batch=1")
    torch.manual_seed(0)
    model = SLAMv1LM(cfg).to(device=device, dtype=dtype).eval()
    print("decode: tokens/s with the KV cache vs recomputing the context per token")
    print(f"{'context':>8} {'cache tok/s':>12} {'recompute tok/s':>16} {'speedup':>8} {'max|dlogit|':>12}")
    speed = []
    for c in contexts:
        row = decode_speed(model, c, args.steps, args.recompute_steps, device)
        speed.append(row)
        print(f"{c:>8} {row['cached_tok_s']:>12.1f} {row['recompute_tok_s']:>16.2f} {row['speedup']:>7.1f}x "
              f"{row['max_abs_diff']:>12.2e}", flush=True)
    print(f"cache size ({args.dtype}): SLAM measured vs analytic, and a same-depth dense model "
          f"({cfg.ef_cycles + 2} layers x N, analytic)")
    print(f"{'N':>8} {'SLAM MB':>10} {'(EF part)':>10} {'analytic MB':>12} {'dense MB':>10} {'SLAM/dense':>11}")
    size_rows = []
    for n in sizes:
        row = cache_size(cfg, n, device, dtype)
        size_rows.append(row)
        print(f"{n:>8} {row['measured_bytes'] / 2**20:>10.2f} {row['ef_bytes'] / 2**20:>10.2f} "
              f"{row['analytic_bytes'] / 2**20:>12.2f} {row['dense_same_depth_bytes'] / 2**20:>10.2f} "
              f"{row['slam_over_dense']:>11.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "dtype": args.dtype, "config": dataclasses.asdict(cfg),
                       "decode": speed, "cache": size_rows}, f, indent=2)


if __name__ == "__main__":
    main()
