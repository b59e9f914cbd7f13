"""SLAM v1 as a causal language model (contract: shared/spec/slam_model.md).

tokens[B, N] -> embedding -> initial_block (full causal attention + FFN)
             -> EF cycle 1..ef_cycles (ef_blocks_A[i] on even segments, ef_blocks_B[i] on odd ones,
                fused by the mean over the segments that hold a position)
             -> final_block -> final norm -> LM head -> logits[B, N, vocab]

This file holds no distributed code: engines apply sharding, activation checkpointing and
compile from outside (see slam_pretrain/engine/), through ``cycle_wrapper`` / ``block_wrapper``.

Choices the spec leaves open (also in docs/DESIGN.md terms):
- Linear layers have no bias (modern LLM practice); LayerNorm keeps its bias, as the prototype's.
- ``norm_f`` is applied in both norm positions (redundant but harmless after a post-norm block).
- RoPE rotates interleaved pairs as complex numbers (RoFormer, Meta's Llama code): one fused
  complex multiply, ~3x cheaper on CPU than the "rotate half" form. Its factors are computed on
  the fly in fp32 from the tokens' global positions (no buffer: nothing to shard, to cast to
  bf16 or to rebuild after meta-device init).
- FLOPs count attention as the dense L x L product (PaLM appendix B, nanoGPT, torchtitan), so MFU
  compares with published numbers; causal kernels do about half of that work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from slam_pretrain.errors import ConfigError, UserError

@dataclass
class ModelConfig:
    """Hyper-parameters of SLAMv1LM. Names follow the seed where it has them."""

    vocab_size: int = 8192
    max_seq_len: int = 1024
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = num_heads (plain MHA)
    d_ff: int = 1536
    ef_cycles: int = 3
    # Segment length and overlap of the EF cycles: an int is tokens, a float in (0, 1] a fraction
    # of the sequence length N (the prototype's preset is 0.6 / 0.2).
    segment_len: Union[int, float] = 256
    overlap: Union[int, float] = 64
    dropout: float = 0.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_position: Literal["pre", "post"] = "pre"
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    pos_encoding: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation factor for context extension
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-5

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def validate(self, prefix: str = "model") -> None:
        """Raise ConfigError naming the key, the value and what is valid."""

        def bad(key: str, value: object, valid: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}={value!r} is invalid: {valid}")

        for key in ("vocab_size", "max_seq_len", "d_model", "num_heads", "d_ff", "ef_cycles"):
            v = getattr(self, key)
            if v <= 0:
                raise bad(key, v, "must be a positive integer")
        if self.num_kv_heads is not None and self.num_kv_heads <= 0:
            raise bad("num_kv_heads", self.num_kv_heads, "must be a positive integer or null")
        if self.d_model % self.num_heads:
            raise bad("d_model", self.d_model, f"must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise bad("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise bad("d_model", self.d_model, "d_model/num_heads must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", self.dropout, "must be in [0, 1)")
        if self.rope_theta <= 0 or self.rope_scaling <= 0:
            key = "rope_theta" if self.rope_theta <= 0 else "rope_scaling"
            raise bad(key, getattr(self, key), "must be positive")
        if self.init_std <= 0 or self.norm_eps <= 0:
            key = "init_std" if self.init_std <= 0 else "norm_eps"
            raise bad(key, getattr(self, key), "must be positive")
        seg, ov = self.segment_len, self.overlap
        if isinstance(seg, float):
            if not 0.0 < seg <= 1.0:
                raise bad("segment_len", seg, "a fraction must be in (0, 1]; use an int for tokens")
            if not (isinstance(ov, float) or ov == 0):
                raise bad("overlap", ov, "must be a fraction too when segment_len is a fraction")
        else:
            if seg <= 0:
                raise bad("segment_len", seg, "must be a positive number of tokens")
            if isinstance(ov, float) and ov != 0:
                raise bad("overlap", ov, "must be tokens (an int) when segment_len is tokens")
        if ov < 0 or ov >= seg / 2:
            raise bad("overlap", ov, f"must satisfy 0 <= overlap < segment_len/2 = {seg / 2:g}")

    def segment_layout(self, n: int) -> tuple[int, int]:
        """(S, O) in tokens for sequence length ``n``; (n, 0) when one segment spans the sequence.

        Fractions: S = max(1, round(segment_len * n)), O = round(overlap * n), then O is lowered
        to keep O < S/2, and S is raised (never past n) if rounding would add a segment to the
        count of the exact fractional layout: 0.6 / 0.2 always gives the prototype's two segments
        [0, S) and [S - O, n). Tokens: (segment_len, overlap) as given.
        """
        if n <= 0:
            raise ValueError(f"sequence length must be positive, got {n}")
        seg, ov = self.segment_len, self.overlap
        if isinstance(seg, float):
            s = max(1, round(seg * n))
            o = min(round(ov * n), (s - 1) // 2)
            # Segments of the exact layout: ceil((1 - ov) / (seg - ov)); 1e-9 absorbs float noise.
            k_exact = 1 if seg >= 1.0 else math.ceil((1.0 - ov) / (seg - ov) - 1e-9)
            if n > s:
                s = max(s, o + math.ceil((n - o) / k_exact))
        else:
            s, o = int(seg), int(ov)
        return (n, 0) if n <= s else (s, o)


# ---------------------------------------------------------------------------------------------
# Building blocks.

def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rope_freqs(positions: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """exp(i * position * theta^(-2j/hd)), complex64 [*positions.shape, head_dim/2] (Su et al. 2021).

    ``rope_scaling`` > 1 is linear position interpolation (Chen et al. 2023): positions / factor.
    """
    hd = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd)
    angles = (positions.to(torch.float32) / cfg.rope_scaling)[..., None] * inv_freq  # [..., hd/2]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) of x [b, h, L, hd] by freqs (complex, broadcastable to
    [b, h, L, hd/2]); computed in fp32 like Llama, returned in x's dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [b, h, L, hd/2]
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


Rope = Optional[torch.Tensor]  # complex RoPE factors [1 or b, 1, L, hd/2]; None: learned positions


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with grouped-query K/V (Ainslie et al. 2023) through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        b, L, d = x.shape  # [b, L, D]
        q, k, v = self.qkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(b, L, self.n_heads, self.hd).transpose(1, 2)  # [b, H, L, hd]
        k = k.view(b, L, self.n_kv, self.hd).transpose(1, 2)  # [b, Hkv, L, hd]
        v = v.view(b, L, self.n_kv, self.hd).transpose(1, 2)  # [b, Hkv, L, hd]
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True,
            enable_gqa=self.n_kv != self.n_heads)  # [b, H, L, hd]
        y = y.transpose(1, 2).reshape(b, L, self.n_heads * self.hd)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), or the prototype's GELU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.ffn == "swiglu"
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.d_ff, bias=False)  # gate|up fused
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # [b, L, F] or [b, L, 2F]
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.drop(self.down(h))  # [b, L, D]


class EncoderBlock(nn.Module):
    """Residual transformer block: pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.norm2, self.ffn = make_norm(cfg), FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope))
        return self.norm2(x + self.ffn(x))


# ---------------------------------------------------------------------------------------------
# EF cycle geometry.

def ef_segments(n: int, segment_len: int, overlap: int) -> list[tuple[int, int]]:
    """Segments [start, end) of one EF cycle: stride T = S - O, segment k = [kT, min(kT + S, n))."""
    s, o = segment_len, overlap
    if n <= 0 or s <= 0 or not 0 <= o < s / 2:
        raise ValueError(f"need n > 0, segment_len > 0, 0 <= overlap < segment_len/2; got {n}, {s}, {o}")
    if n <= s:
        return [(0, n)]
    t = s - o
    k = -(-(n - o) // t)  # ceil((n - O) / T)
    return [(i * t, min(i * t + s, n)) for i in range(k)]


@dataclass
class EFPlan:
    """Index tensors of the batched EF cycle for one sequence length (cached per (n, device)).

    Even segments form one batch [B*K_even, S, D], odd ones another; the last segment, if ragged,
    is padded at its end with copies of position n-1 (causal attention never looks back at them,
    and fusion never reads them). Block outputs are concatenated as [even slots | odd slots] and
    position p reads slots ``first[p]`` and ``second[p]`` (equal when one segment holds p), so
    the fusion mean is 0.5 * (y[first] + y[second]): a gather, deterministic, no N x N mask.
    """

    n: int
    seg: int  # S, the padded length of every segment
    num_segments: int  # K
    k_even: int
    k_odd: int
    idx_even: torch.Tensor  # [K_even*S] global position of each even-batch slot
    idx_odd: torch.Tensor  # [K_odd*S]
    first: torch.Tensor  # [n] slot of the first segment holding p, in [even | odd] order
    second: torch.Tensor  # [n] slot of the second one (== first if only one holds p)


def build_ef_plan(n: int, seg: int, overlap: int, device: torch.device) -> EFPlan:
    """Precompute gather indices of the EF cycle for sequence length n (see EFPlan)."""
    k = len(ef_segments(n, seg, overlap))
    seg = min(seg, n)  # one segment: no padding
    t = seg - overlap
    k_even, k_odd = (k + 1) // 2, k // 2
    pos = torch.arange(k, device=device)[:, None] * t + torch.arange(seg, device=device)  # [K, S]
    pos = pos.clamp(max=n - 1)  # ragged last segment: pad with position n-1
    p = torch.arange(n, device=device)

    def slot(kk: torch.Tensor) -> torch.Tensor:  # slot of position p in segment kk, [n]
        base = torch.where(kk % 2 == 0, (kk // 2) * seg, (k_even + kk // 2) * seg)
        return base + p - kk * t

    k_hi = (p // t).clamp(max=k - 1)  # last segment starting at or before p
    k_lo = (torch.div(p - seg, t, rounding_mode="floor") + 1).clamp(min=0)  # first one ending after p
    return EFPlan(n, seg, k, k_even, k_odd, pos[0::2].reshape(-1), pos[1::2].reshape(-1),
                  slot(k_lo), slot(k_hi))


# ---------------------------------------------------------------------------------------------
# The model.

Wrapper = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]


class SLAMv1LM(nn.Module):
    """Decoder-only SLAM v1: full block, ef_cycles EF cycles over segments, full block, LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.initial_block = EncoderBlock(cfg)
        self.ef_blocks_A = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.ef_cycles))
        self.ef_blocks_B = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.ef_cycles))
        self.final_block = EncoderBlock(cfg)
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Activation checkpointing hooks, set by the engine: w(fn, x) replaces fn(x).
        self.cycle_wrapper: Optional[Wrapper] = None  # one region per EF cycle (A, B and fusion)
        self.block_wrapper: Optional[Wrapper] = None  # initial_block and final_block
        self._plans: dict[tuple[int, str], EFPlan] = {}
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, init_std) for weights; residual output projections scaled by 1/sqrt(2 * depth),
        depth = blocks on a token's path (ef_cycles + 2), as GPT-2. Also (re)ties lm_head, which
        ``to_empty()`` after meta-device construction unties."""
        cfg = self.config
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.reset_parameters()
        resid_std = cfg.init_std / math.sqrt(2 * (cfg.ef_cycles + 2))
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    def ef_plan(self, n: int, device: torch.device) -> EFPlan:
        key = (n, str(device))
        if key not in self._plans:
            self._plans[key] = build_ef_plan(n, *self.config.segment_layout(n), device)
        return self._plans[key]

    def _ef_cycle(self, i: int, plan: EFPlan, rope_even: Rope, rope_odd: Rope, x: torch.Tensor) -> torch.Tensor:
        """One EF cycle: A on even segments, B on odd ones (one call each), fusion mean. x [B, N, D]."""
        if plan.num_segments == 1:
            return self.ef_blocks_A[i](x, rope_even)
        b, n, d = x.shape
        xe = x.index_select(1, plan.idx_even).view(b * plan.k_even, plan.seg, d)  # [B*K_even, S, D]
        xo = x.index_select(1, plan.idx_odd).view(b * plan.k_odd, plan.seg, d)  # [B*K_odd, S, D]
        ye = self.ef_blocks_A[i](xe, rope_even).view(b, plan.k_even * plan.seg, d)
        yo = self.ef_blocks_B[i](xo, rope_odd).view(b, plan.k_odd * plan.seg, d)
        y = torch.cat([ye, yo], dim=1)  # [B, K*S, D] in slot order
        return 0.5 * (y.index_select(1, plan.first) + y.index_select(1, plan.second))  # [B, N, D]

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """tokens [B, N] -> logits [B, N, V], or (logits, mean CE loss) when targets are given."""
        cfg = self.config
        b, n = tokens.shape
        if n > cfg.max_seq_len:
            raise UserError(f"sequence length {n} is longer than model.max_seq_len={cfg.max_seq_len}")
        plan = self.ef_plan(n, tokens.device)
        x = self.tok_emb(tokens)  # [B, N, D]
        rope = rope_even = rope_odd = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(n, device=tokens.device))
        else:  # RoPE factors of each segment slot come from its global position
            freqs = rope_freqs(torch.arange(n, device=tokens.device), cfg)  # [N, hd/2]
            rope = freqs[None, None]  # [1, 1, N, hd/2]

            def seg_rope(idx: torch.Tensor, k: int) -> Rope:  # [B*k, 1, S, hd/2], b-major like x
                return freqs[idx].view(k, 1, plan.seg, -1).repeat(b, 1, 1, 1)

            rope_even = seg_rope(plan.idx_even, plan.k_even) if plan.num_segments > 1 else rope
            rope_odd = seg_rope(plan.idx_odd, plan.k_odd) if plan.k_odd else None
        x = self.drop(x)

        def run(wrapper: Optional[Wrapper], fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
            return fn(x) if wrapper is None else wrapper(fn, x)

        x = run(self.block_wrapper, lambda h: self.initial_block(h, rope), x)
        for i in range(cfg.ef_cycles):
            x = run(self.cycle_wrapper, lambda h, i=i: self._ef_cycle(i, plan, rope_even, rope_odd, h), x)
        x = run(self.block_wrapper, lambda h: self.final_block(h, rope), x)
        logits = self.lm_head(self.norm_f(x))  # [B, N, V]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


# ---------------------------------------------------------------------------------------------
# Counts: one source for the trainer's MFU, the dry-run summary and plan-style estimates.

def _block_matmul_params(cfg: ModelConfig) -> int:
    attn = cfg.d_model * (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * cfg.d_model
    ffn = (3 if cfg.ffn == "swiglu" else 2) * cfg.d_model * cfg.d_ff
    return attn + ffn


def count_params(model_or_config: Union[nn.Module, ModelConfig], non_embedding: bool = False) -> int:
    """Parameters, tied weights once: analytic from a ModelConfig, counted from a module.

    ``non_embedding`` leaves out the token/position embeddings (and an untied lm_head).
    """
    if isinstance(model_or_config, nn.Module):
        params = dict(model_or_config.named_parameters())  # named_parameters() drops tied duplicates
        if non_embedding:
            params = {k: v for k, v in params.items() if not k.startswith(("tok_emb", "pos_emb", "lm_head"))}
        return sum(getattr(p, "ds_numel", p.numel()) for p in params.values())  # ds_numel: ZeRO-3
    cfg = model_or_config
    norm = (2 if cfg.norm == "layernorm" else 1) * cfg.d_model
    blocks = (2 + 2 * cfg.ef_cycles) * (_block_matmul_params(cfg) + 2 * norm) + norm  # + norm_f
    if non_embedding:
        return blocks
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    pos = cfg.max_seq_len * cfg.d_model if cfg.pos_encoding == "learned" else 0
    return blocks + emb + pos


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token at sequence length seq_len.

    Matmuls: 6 x params x tokens that pass through them (EF overlap tokens twice, padding not
    counted), lm_head included even when tied. Attention: 12 x L^2 x D per layer and sequence
    (QK^T and AV, dense L x L as PaLM counts), L = N for the full blocks, the segment length for
    EF blocks.
    """
    cfg, n = config, seq_len
    segs = ef_segments(n, *cfg.segment_layout(n))
    ef_tokens = sum(e - s for s, e in segs)  # N + (K-1)*O
    ef_sq = sum((e - s) ** 2 for s, e in segs)
    matmul = 6 * _block_matmul_params(cfg) * (2 * n + cfg.ef_cycles * ef_tokens) + 6 * cfg.vocab_size * cfg.d_model * n
    attn = 12 * cfg.num_heads * cfg.head_dim * (2 * n * n + cfg.ef_cycles * ef_sq)
    return (matmul + attn) / n


def model_summary(config: ModelConfig, seq_len: int) -> str:
    """A few lines for ``train --dry-run``: parameters, FLOPs per token, the EF segment layout."""
    cfg = config
    s, o = cfg.segment_layout(seq_len)
    segs = ef_segments(seq_len, s, o)
    shown = ", ".join(f"[{a},{b})" for a, b in (segs if len(segs) <= 6 else segs[:3]))
    if len(segs) > 6:
        shown += f", ... [{segs[-1][0]},{segs[-1][1]})"
    fpt = flops_per_token(cfg, seq_len)
    return "\n".join([
        f"SLAMv1LM: {count_params(cfg):,} parameters ({count_params(cfg, non_embedding=True):,} non-embedding), "
        f"{2 + 2 * cfg.ef_cycles} blocks (depth per token {cfg.ef_cycles + 2})",
        f"  d_model={cfg.d_model} heads={cfg.num_heads} kv_heads={cfg.kv_heads} d_ff={cfg.d_ff} "
        f"{cfg.norm_position}-norm {cfg.norm} {cfg.ffn} {cfg.pos_encoding} tie_embeddings={cfg.tie_embeddings}",
        f"  FLOPs per token (fwd+bwd) at seq_len {seq_len}: {fpt:.4g} ({fpt * seq_len:.4g} per sequence)",
        f"  EF segments at seq_len {seq_len}: S={s} O={o} stride={s - o if len(segs) > 1 else s} "
        f"K={len(segs)}: {shown}",
    ])
