"""GPU figures only a GPU can give: bf16 matmul peak, flash attention, training MFU, long-context memory.

Usage (on a CUDA machine):  python benchmarks/bench_gpu.py [--json OUT.json] [--quick]

Every ratio is against a baseline measured in the same run:
  1. bf16 matmul peak (8192^3), measured, next to the data-sheet peak used for MFU.
  2. scaled_dot_product_attention: flash vs math backend at SLAM's shapes (causal, bf16).
  3. Training step (forward + backward + fused AdamW, bf16 autocast, fp32 master weights) for the
     125M and 1B presets: tokens/s and MFU = tokens/s x flops_per_token / peak; SLAM vs the same
     model with one segment spanning the sequence ("same depth", dense attention in every block).
  4. Long context (the 32K preset's 1B model, batch 1): peak memory and step time of forward +
     backward at 32K and 64K tokens, activation checkpointing none / ef_cycles / all, SLAM vs same-depth.
The model code is slam_pretrain/model/slam_v1.py; activation checkpointing is the engine's own helper.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import yaml  # noqa: E402

from slam_pretrain.engine.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from slam_pretrain.model import ModelConfig, SLAMv1LM, count_params, flops_per_token  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_DATASHEET = 989e12  # H100/H200 SXM dense bf16
T_START = time.perf_counter()


def preset(name: str, **over) -> ModelConfig:
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"]
    raw.update(over)
    return ModelConfig(**raw)


def timed(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def matmul_peak() -> dict:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    dt = timed(lambda: a @ b, warmup=3, iters=10)
    return {"bf16_matmul_tflops": 2 * n**3 / dt / 1e12, "datasheet_tflops": PEAK_BF16_DATASHEET / 1e12}


def attention_backends() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for (b, h, hkv, n, hd) in [(8, 12, 12, 2048, 64), (1, 16, 16, 16384, 128), (16, 16, 8, 2048, 128),
                               (1, 16, 8, 16384, 128)]:
        q = torch.randn(b, h, n, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, hkv, n, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        gqa = hkv != h
        row = {"shape": f"B{b} H{h} Hkv{hkv} N{n} hd{hd}"}
        for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("math", SDPBackend.MATH)]:
            if name == "math" and n > 8192:
                row[name + "_ms"] = None  # N x N scores of this size: minutes and tens of GB
                continue
            try:
                with sdpa_kernel(backend):
                    def step(q=q, k=k, v=v):  # bound now: the loop deletes them at its end
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                        o.sum().backward()
                    row[name + "_ms"] = 1000 * timed(step, warmup=1, iters=3)
            except RuntimeError as e:
                row[name + "_ms"] = None
                row[name + "_error"] = str(e).splitlines()[0][:120]
        # What the model actually gets with the default dispatcher.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            torch.cuda.synchronize()
        kernels = {e.key for e in prof.key_averages()}
        row["default_uses_flash"] = any("flash" in k.lower() for k in kernels)
        if row.get("flash_ms") and row.get("math_ms"):
            row["flash_speedup_vs_math"] = row["math_ms"] / row["flash_ms"]
        rows.append(row)
        del q, k, v
    return rows


def train_step_fn(cfg: ModelConfig, batch: int, seq: int, ac: str = "none"):
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: a 1B model's init on the CPU takes ~10 s
        model = SLAMv1LM(cfg)
    apply_activation_checkpointing(model, ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def throughput(name: str, cfg: ModelConfig, batch: int, seq: int, peak: float, iters: int) -> dict:
    out = {"preset": name, "params_M": count_params(cfg) / 1e6, "batch": batch, "seq": seq}
    for label, c in [("slam", cfg), ("same_depth", dataclasses.replace(cfg, segment_len=seq, overlap=0))]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model, opt, step = train_step_fn(c, batch, seq)
        dt = timed(step, warmup=2, iters=iters)
        tps = batch * seq / dt
        fpt = flops_per_token(c, seq)
        out[label] = {"step_s": dt, "tokens_per_s": tps, "tflops": tps * fpt / 1e12,
                      "mfu_datasheet": tps * fpt / PEAK_BF16_DATASHEET, "mfu_measured_peak": tps * fpt / peak,
                      "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
        del model, opt, step
    out["slam_vs_same_depth_time"] = out["slam"]["step_s"] / out["same_depth"]["step_s"]
    return out


def _memory_row(cfg: ModelConfig, seq: int, ac: str) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        model, opt, step = train_step_fn(cfg, 1, seq, ac)
        step()  # the first step allocates the optimizer state: count it in the baseline
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        dt = timed(step, warmup=0, iters=2)
        return {"step_s": dt, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
                "activation_mem_gb": (torch.cuda.max_memory_allocated() - base) / 1e9}
    except torch.OutOfMemoryError:
        return {"oom": True}


def long_context(cfg: ModelConfig, seqs: list[int], budget_s: float) -> list[dict]:
    rows = []
    for seq in seqs:
        for label, c in [("slam", dataclasses.replace(cfg, max_seq_len=max(seq, cfg.max_seq_len))),
                         ("same_depth", dataclasses.replace(cfg, max_seq_len=max(seq, cfg.max_seq_len),
                                                            segment_len=seq, overlap=0))]:
            for ac in ("none", "ef_cycles", "all"):
                if time.perf_counter() - T_START > budget_s:
                    rows.append({"seq": seq, "model": label, "ac": ac, "skipped": "time budget"})
                    continue
                row = {"seq": seq, "model": label, "ac": ac}
                row.update(_memory_row(c, seq, ac))
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining long-context rows after this")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(res), flush=True)
    res["matmul"] = matmul_peak()
    print(json.dumps(res["matmul"]), flush=True)
    peak = res["matmul"]["bf16_matmul_tflops"] * 1e12
    res["attention"] = attention_backends()
    for r in res["attention"]:
        print(json.dumps(r), flush=True)
    res["train"] = []
    for name, batch, seq, iters in [("slam_125m", 16, 2048, 8), ("slam_1b", 8, 4096, 5)]:
        cfg = preset(name)
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq))
        r = throughput(name, cfg, batch, seq, peak, iters)
        res["train"].append(r)
        print(json.dumps(r), flush=True)
    res["long_context"] = long_context(preset("long_context_32k"), [32768, 65536], args.budget_s)
    res["elapsed_s"] = time.perf_counter() - T_START
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"elapsed {res['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
