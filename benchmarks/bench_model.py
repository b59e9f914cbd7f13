"""Forward+backward step time and memory of SLAM v1 against two dense baselines, same run.

- slam:       fixed EF segments (default 256 tokens, overlap 64): EF attention is O(N * S).
- same-depth: the same model with one segment spanning the sequence (segment_len = N,
              overlap 0): the same blocks on a token's path (ef_cycles + 2), all full attention.
- dense:      a plain transformer with as many blocks as SLAM has (2 + 2 * ef_cycles), all full
              attention: the same parameters, more depth.
- inherent:   SLAM's own blocks on segments that are already batched (no gather, concatenation,
              RoPE slot factors or fusion): what an EF cycle costs at the speed of its FLOPs.
              ``EF overhead`` = slam / inherent (1.00 would be a free segment layout).

Memory: ``act_MB`` is the bytes of the tensors autograd saves for backward in one forward (unique
storages, parameters excluded), measured with ``torch.autograd.graph.saved_tensors_hooks``: exact
and device-independent, what activation memory is. On CUDA ``peak_MB`` also gives
``torch.cuda.max_memory_allocated`` over the step.

    python benchmarks/bench_model.py                      # CPU, N = 1K..16K, ~3 min on 2 cores
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --sizes 4K,16K,64K --json out.json
    python benchmarks/bench_model.py --attention math --sizes 1K,2K,4K   # N x N scores materialized
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from slam_pretrain.engine.activation_checkpointing import saved_activation_bytes
from slam_pretrain.model import (EncoderBlock, ModelConfig, SLAMv1LM, count_params, flops_per_token, make_norm,
                                 rope_freqs)


class DenseLM(nn.Module):
    """Baseline: tok_emb -> num_blocks full-attention blocks -> norm -> lm_head (SLAM's parts)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(num_blocks))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor):
        n = tokens.shape[1]
        rope = rope_freqs(torch.arange(n, device=tokens.device), self.cfg)[None, None]  # [1, 1, N, hd/2]
        x = self.tok_emb(tokens)  # [B, N, D]
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.norm_f(x))
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class InherentSLAM(nn.Module):
    """SLAM's blocks with the segment layout taken for free: embedding, initial block on [B, N, D],
    then per cycle A on [B*K_even, S, D] and B on [B*K_odd, S, D] (each fed the previous cycle's
    output of the same shape; the first cycle a free view of the initial block's output), the final
    block on the initial block's output, norm, head, loss. The EF outputs join the loss with weight
    0, so backward runs through every block (the same work; the gradients are not the model's)."""

    def __init__(self, model: SLAMv1LM):
        super().__init__()
        self.m = model
        self.tok_emb = model.tok_emb

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor):
        m, (b, n) = self.m, tokens.shape
        plan = m.ef_plan(n, tokens.device)
        x = m.initial_block(m.tok_emb(tokens), plan.rope_full)  # [B, N, D]
        d, p = x.shape[-1], plan.pad
        flat = x.reshape(-1, d)
        reps = -(-(b * (plan.k_even + plan.k_odd) * p) // flat.shape[0])  # enough rows for both batches
        flat = flat.repeat(reps, 1) if reps > 1 else flat
        xe = flat[:b * plan.k_even * p].view(b * plan.k_even, p, d)  # free views: the layout costs nothing
        xo = flat[b * plan.k_even * p:b * (plan.k_even + plan.k_odd) * p].view(b * plan.k_odd, p, d)
        for i in range(m.config.ef_cycles):
            xe = m.ef_blocks_A[i](xe, plan.rope_even)
            xo = m.ef_blocks_B[i](xo, plan.rope_odd) if plan.k_odd else xo
        logits = m.lm_head(m.norm_f(m.final_block(x, plan.rope_full)))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss + 0.0 * (xe.float().mean() + xo.float().mean())


def measure(model: nn.Module, n: int, device: torch.device, repeats: int, budget_s: float,
            backends: list[SDPBackend]) -> dict[str, float]:
    """Fastest of up to ``repeats`` steps (fewer once they pass budget_s), after a warm-up step.

    The minimum, as ``timeit`` advises: on a shared machine noise only ever adds time."""
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, model.tok_emb.num_embeddings, (1, n + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> torch.Tensor:
        with sdpa_kernel(backends):
            return model(x, y)[1]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    loss, act = saved_activation_bytes(step, model)  # also the warm-up step
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    while len(times) < repeats and sum(times) < budget_s:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step().backward()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        model.zero_grad(set_to_none=True)
    out = {"time_s": min(times), "cpu_s": min(cpu_times), "act_MB": act / 2**20}
    if device.type == "cuda":
        out["peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def parse_sizes(text: str) -> list[int]:
    return [int(float(s[:-1]) * 1024) if s.lower().endswith("k") else int(s) for s in text.split(",")]


KINDS = ["slam", "same-depth", "dense", "inherent"]


def build(kind: str, base: ModelConfig, n: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "dense":
        return DenseLM(base, 2 + 2 * base.ef_cycles)
    if kind == "same-depth":
        return SLAMv1LM(dataclasses.replace(base, segment_len=n, overlap=0))
    if kind == "inherent":
        return InherentSLAM(SLAMv1LM(base))
    return SLAMv1LM(base)


def bench_size(args: argparse.Namespace, base: ModelConfig, n: int, device: torch.device,
               backends: list[SDPBackend]) -> dict:
    """One row: the three models at sequence length n, and SLAM's ratios to the baselines."""
    row: dict = {"n": n}
    for kind in KINDS:
        model = build(kind, base, n).to(device=device, dtype=getattr(torch, args.dtype))
        row[kind] = {**measure(model, n, device, args.repeats, args.max_point_s, backends),
                     "params": count_params(model)}
        del model
    assert row["slam"]["params"] == row["dense"]["params"]
    mem_key = "peak_MB" if device.type == "cuda" else "act_MB"
    row["ef_overhead"] = row["slam"][args.clock] / row["inherent"][args.clock]
    for what, key in (("time", args.clock), ("mem", mem_key)):
        for kind in ("same-depth", "dense"):
            row[f"{what}_slam_over_{kind.replace('-', '_')}"] = row["slam"][key] / row[kind][key]
    # Analytic FLOP ratio (flops_per_token counts dense L x L attention), to read the times against.
    same = dataclasses.replace(base, segment_len=n, overlap=0)
    row["flops_slam_over_same_depth"] = flops_per_token(base, n) / flops_per_token(same, n)
    return row


RATIOS = [("EF overhead", "ef_overhead"), ("t slam/same", "time_slam_over_same_depth"), ("t slam/dense", "time_slam_over_dense"),
          ("m slam/same", "mem_slam_over_same_depth"), ("m slam/dense", "mem_slam_over_dense"),
          ("F slam/same", "flops_slam_over_same_depth")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1K,2K,4K,8K,16K", help="sequence lengths, e.g. 1K,2K,4096")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3, help="timed steps per point after one warm-up (fastest)")
    p.add_argument("--max-point-s", type=float, default=10.0,
                   help="stop repeating a point once its timed steps took this long (at least one step)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ef-cycles", type=int, default=3)
    p.add_argument("--segment-len", type=int, default=256)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--attention", default="auto", choices=["auto", "math"],
                   help="math: materialize the N x N scores (the regime of the prototype's memory claim)")
    p.add_argument("--clock", default="time_s", choices=["time_s", "cpu_s"],
                   help="cpu_s: this process's CPU time, steadier than wall time on a shared CPU")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    args = p.parse_args()

    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    sizes = parse_sizes(args.sizes)
    backends = [SDPBackend.MATH] if args.attention == "math" else [
        SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    base = ModelConfig(vocab_size=2048, max_seq_len=max(sizes), d_model=args.d_model, num_heads=args.heads,
                       d_ff=int(2.75 * args.d_model), ef_cycles=args.ef_cycles,
                       segment_len=args.segment_len, overlap=args.overlap)
    mem_key = "peak_MB" if device.type == "cuda" else "act_MB"
    print(f"device={device} dtype={args.dtype} attention={args.attention} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} d_model={base.d_model} heads={base.num_heads} d_ff={base.d_ff} "
          f"ef_cycles={base.ef_cycles} S={base.segment_len} O={base.overlap} batch=1")
    print(f"same-depth = one segment spanning N (depth per token {base.ef_cycles + 2}); "
          f"dense = {2 + 2 * base.ef_cycles} full-attention blocks (same parameters); "
          f"inherent = SLAM's blocks on pre-batched segments (EF overhead = slam / inherent)")
    clock = "wall-clock" if args.clock == "time_s" else "process CPU"
    memory = "peak cuda memory allocated" if device.type == "cuda" else "activations saved for backward"
    print(f"s = {clock} seconds per step (fastest of repeats); MB = {memory}")
    print(f"{'N':>6} " + " ".join(f"{k + ' s':>12} {k + ' MB':>14}" for k in KINDS) +
          "".join(f" {title:>12}" for title, _ in RATIOS))
    rows = []
    for n in sizes:
        row = bench_size(args, base, n, device, backends)
        rows.append(row)
        print(f"{n:>6} " + " ".join(f"{row[k][args.clock]:>12.3f} {row[k][mem_key]:>14.1f}" for k in KINDS) +
              "".join(f" {row[key]:>12.2f}" for _, key in RATIOS), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "dtype": args.dtype, "attention": args.attention, "clock": args.clock,
                       "config": dataclasses.asdict(base), "memory_metric": mem_key, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
