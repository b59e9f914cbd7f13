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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from slam_pretrain.errors import ConfigError, UserError

LAYOUT_REVISION = 2  # the EF segment layout this code implements (shared/spec/slam_model.md)

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
    # EF segment layout revision (spec revision 2: K = ceil(N / T), prefix-consistent). Recorded in
    # every checkpoint and export; a checkpoint without it predates revision 2 (see validate).
    layout_revision: int = 2

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def fractional_segments(self) -> bool:
        """segment_len/overlap are fractions of N: the layout moves with N (no prefix consistency)."""
        return isinstance(self.segment_len, float)

    @property
    def prefix_consistent(self) -> bool:
        """logits(x[:, :n]) == logits(x)[:, :n] for every n, so an exact KV cache exists."""
        return not self.fractional_segments

    def ef_segments(self, n: int) -> list[tuple[int, int]]:
        """The EF segments [start, end) at sequence length n (see the function ``ef_segments``)."""
        return ef_segments(n, *self.segment_layout(n), drop_overlap_tail=self.fractional_segments)

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
        if self.layout_revision not in (1, LAYOUT_REVISION):
            raise bad("layout_revision", self.layout_revision, f"this version implements {LAYOUT_REVISION}")
        if self.layout_revision == 1 and not self.fractional_segments:
            # Revision 1 dropped a trailing segment holding only overlap positions: a model trained
            # so computes another function under revision 2 for ~O/T of its positions. No silent
            # change of function: retrain, or fine-tune under revision 2 and say so.
            raise bad("layout_revision", 1, f"weights trained with EF segment layout revision 1 "
                      f"(K = ceil((N - O)/T)) compute another function under revision {LAYOUT_REVISION} "
                      f"(K = ceil(N/T)); retrain, or fine-tune under revision {LAYOUT_REVISION} and set "
                      f"model.layout_revision={LAYOUT_REVISION} knowingly")

    def segment_layout(self, n: int) -> tuple[int, int]:
        """(S, O) in tokens for sequence length ``n``.

        Tokens: (segment_len, overlap) as given, whatever n is (prefix consistency needs the same
        layout at every length). Fractions: (n, 0) when one segment spans the sequence; else
        S = max(1, round(segment_len * n)), O = round(overlap * n), then O is lowered to keep
        O < S/2, and S is raised (never past n) if rounding would add a segment to the count of the
        exact fractional layout: 0.6 / 0.2 always gives the prototype's two segments [0, S) and
        [S - O, n).
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
            return (n, 0) if n <= s else (s, o)
        return int(seg), int(ov)


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
    """Rotate pairs (x[2j], x[2j+1]) of x [b, h, L, hd] by freqs, complex [k, 1, L, hd/2] with
    b = B * k (k = 1: one set for every sequence; k = segments of a batch, b-major: the factors of
    each segment slot, shared by the B sequences without a copy); fp32 like Llama, x's dtype out."""
    k = freqs.shape[0]
    xc = torch.view_as_complex(x.float().reshape(-1, k, *x.shape[1:-1], x.shape[-1] // 2, 2))  # [B, k, h, L, hd/2]
    return torch.view_as_real(xc * freqs).reshape(x.shape).type_as(x)


Rope = Optional[torch.Tensor]  # complex RoPE factors [k, 1, L, hd/2] (see apply_rope); None: learned positions


@dataclass
class KVSlot:
    """One attention layer's key/value buffers during incremental decoding (kv_cache.py).

    The new token's keys/values go to slot ``index[b]`` of row b, and the query attends to the
    slots ``<= index[b]``; ``length`` = max(index) + 1 bounds the slots read.
    """

    k: torch.Tensor  # [B, Hkv, C, hd]
    v: torch.Tensor  # [B, Hkv, C, hd]
    index: torch.Tensor  # [B] long
    length: int


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with grouped-query K/V (Ainslie et al. 2023) through SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def project(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, L, D] -> q [b, H, L, hd], k and v [b, Hkv, L, hd], RoPE applied."""
        b, L, d = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(b, L, self.n_heads, self.hd).transpose(1, 2)  # [b, H, L, hd]
        k = k.view(b, L, self.n_kv, self.hd).transpose(1, 2)  # [b, Hkv, L, hd]
        v = v.view(b, L, self.n_kv, self.hd).transpose(1, 2)  # [b, Hkv, L, hd]
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Rope, kv: Optional[KVSlot] = None) -> torch.Tensor:
        b, L, d = x.shape  # [b, L, D]
        q, k, v = self.project(x, rope)
        gqa = self.n_kv != self.n_heads
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, enable_gqa=gqa)  # [b, H, L, hd]
        else:  # one new token per row (L = 1): store its k/v, attend to the row's valid slots
            rows = torch.arange(b, device=x.device)
            kv.k[rows, :, kv.index] = k[:, :, 0]
            kv.v[rows, :, kv.index] = v[:, :, 0]
            valid = torch.arange(kv.length, device=x.device) <= kv.index[:, None]  # [b, length]
            y = F.scaled_dot_product_attention(q, kv.k[:, :, :kv.length], kv.v[:, :, :kv.length],
                                               attn_mask=valid[:, None, None, :], enable_gqa=gqa)  # [b, H, 1, hd]
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

    def forward(self, x: torch.Tensor, rope: Rope = None, kv: Optional[KVSlot] = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, kv)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, kv))
        return self.norm2(x + self.ffn(x))

    def keys_values(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values this block's attention computes for the block input x [b, L, D]."""
        _, k, v = self.attn.project(self.norm1(x) if self.pre_norm else x, rope)
        return k, v


# ---------------------------------------------------------------------------------------------
# EF cycle geometry.

def ef_segments(n: int, segment_len: int, overlap: int, drop_overlap_tail: bool = False) -> list[tuple[int, int]]:
    """Segments [start, end) of one EF cycle: stride T = S - O, segment k = [kT, min(kT + S, n)).

    Revision 2 of the layout: every segment that starts before n exists, K = ceil(n / T), so the
    segments holding position p are {k : kT <= p < kT + S} whatever n is (prefix consistency).
    ``drop_overlap_tail`` keeps revision 1's count K = ceil((n - O) / T) (1 when n <= S), which
    drops a trailing segment holding only overlap positions: fractional layouts use it to keep the
    prototype's two segments (they move with n, so they are not prefix-consistent anyway).
    """
    s, o = segment_len, overlap
    if n <= 0 or s <= 0 or not 0 <= o < s / 2:
        raise ValueError(f"need n > 0, segment_len > 0, 0 <= overlap < segment_len/2; got {n}, {s}, {o}")
    t = s - o
    k = (1 if n <= s else -(-(n - o) // t)) if drop_overlap_tail else -(-n // t)
    return [(i * t, min(i * t + s, n)) for i in range(k)]


@dataclass
class EFPlan:
    """Layout of the batched EF cycle for one sequence length (cached per (n, device)).

    Even segments start at 2jT and odd ones at (2j+1)T, so with S < 2T (O < S/2) the even
    segments are the first S rows of the N tokens cut into periods of 2T, and the odd ones the
    same after a shift of T: a pad, a view and a slice build each batch (no gather), and the same
    in reverse places the block outputs (no scatter). Segments are padded to ``pad`` = min(S, N)
    tokens at their end, which causal attention never looks back from and fusion never reads.
    The fusion mean is (even + odd) * weight, weight 0.5 where two segments hold p, else 1.
    """

    n: int
    seg: int  # S
    stride: int  # T = S - O
    pad: int  # padded length of every segment in the batches, min(S, n)
    k_even: int
    k_odd: int
    weight: torch.Tensor  # [n, 1] fp32: 1 / (number of segments holding p)
    rope_full: Rope  # [1, 1, n, hd/2] for the full blocks (None: learned positions)
    rope_even: Rope  # [K_even, 1, pad, hd/2], each slot's global position
    rope_odd: Rope  # [K_odd, 1, pad, hd/2]


def build_ef_plan(cfg: "ModelConfig", n: int, device: torch.device) -> EFPlan:
    """The EFPlan of cfg at sequence length n: segment counts, fusion weights and RoPE factors."""
    segs = cfg.ef_segments(n)
    s, o = cfg.segment_layout(n)
    k, t, pad = len(segs), s - o, min(s, n)
    count = torch.zeros(n, 1)
    for a, e in segs:
        count[a:e] += 1
    rope_full = rope_even = rope_odd = None
    if cfg.pos_encoding == "rope":
        rope_full = rope_freqs(torch.arange(n, device=device), cfg)[None, None]
        slots = torch.arange(pad, device=device)
        rope_even = rope_freqs(torch.arange(0, k, 2, device=device)[:, None] * t + slots, cfg)[:, None]
        rope_odd = rope_freqs(torch.arange(1, k, 2, device=device)[:, None] * t + slots, cfg)[:, None]
    return EFPlan(n, s, t, pad, (k + 1) // 2, k // 2, (1.0 / count).to(device), rope_full, rope_even, rope_odd)


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [B, L, D] cut or zero-padded at its end to [B, length, D]."""
    return x[:, :length] if x.shape[1] >= length else F.pad(x, (0, 0, 0, length - x.shape[1]))


# ---------------------------------------------------------------------------------------------
# The model.

Wrapper = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]
PLAN_CACHE_SIZE = 8  # EF plans kept (LRU): generation and eval see many lengths, training one


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
        self._plans: OrderedDict[tuple[int, str], EFPlan] = OrderedDict()
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
        """The plan for length n, from a small LRU cache (memory does not grow with lengths seen)."""
        key = (n, str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_ef_plan(self.config, n, device)
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _ef_cycle(self, i: int, plan: EFPlan, x: torch.Tensor) -> torch.Tensor:
        """One EF cycle: A on even segments, B on odd ones (one call each), fusion mean. x [B, N, D]."""
        if plan.k_odd == 0:  # one segment holds the whole sequence
            return self.ef_blocks_A[i](x, plan.rope_full)
        b, n, d = x.shape
        t, p, ke, ko = plan.stride, plan.pad, plan.k_even, plan.k_odd
        span = max(ke, ko + 1) * 2 * t  # room for both batches' periods (odd ones start at T)

        def periods(h: torch.Tensor, start: int, k: int) -> torch.Tensor:  # [B, k, 2T, D] view of h
            return h[:, start:start + k * 2 * t].view(b, k, 2 * t, d)

        xp = _fit(x, span)  # [B, span, D]: zero padding past N
        xe = periods(xp, 0, ke)[:, :, :p].reshape(b * ke, p, d)  # [B*K_even, P, D]
        xo = periods(xp, t, ko)[:, :, :p].reshape(b * ko, p, d)  # [B*K_odd, P, D]
        ye = self.ef_blocks_A[i](xe, plan.rope_even).view(b, ke, p, d)
        yo = self.ef_blocks_B[i](xo, plan.rope_odd).view(b, ko, p, d)
        # Back to positions, in place in one buffer (no concatenation), then the fusion mean.
        out = ye.new_zeros(b, span, d)
        periods(out, 0, ke)[:, :, :p] = ye
        periods(out, t, ko)[:, :, :p] += yo
        return out[:, :n] * plan.weight.to(out.dtype)  # [B, N, D]

    def features(self, tokens: torch.Tensor, hidden: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """tokens [B, N] -> the trunk's output after the final norm, [B, N, D] (what the LM head
        reads; a classification head reads it too).

        ``hidden``: a list that receives the input of every stage (initial block, each EF cycle,
        final block), each [B, N, D]; the KV cache's prefill reads keys and values from them.
        """
        cfg = self.config
        b, n = tokens.shape
        if n > cfg.max_seq_len:
            raise UserError(f"sequence length {n} is longer than model.max_seq_len={cfg.max_seq_len}")
        plan = self.ef_plan(n, tokens.device)
        x = self.tok_emb(tokens)  # [B, N, D]
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(n, device=tokens.device))
        x = self.drop(x)

        def run(wrapper: Optional[Wrapper], fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
            if hidden is not None:
                hidden.append(x)
            return fn(x) if wrapper is None else wrapper(fn, x)

        x = run(self.block_wrapper, lambda h: self.initial_block(h, plan.rope_full), x)
        for i in range(cfg.ef_cycles):
            x = run(self.cycle_wrapper, lambda h, i=i: self._ef_cycle(i, plan, h), x)
        x = run(self.block_wrapper, lambda h: self.final_block(h, plan.rope_full), x)
        return self.norm_f(x)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                hidden: Optional[list[torch.Tensor]] = None):
        """tokens [B, N] -> logits [B, N, V], or (logits, mean CE loss) when targets are given
        (``hidden``: see ``features``)."""
        logits = self.lm_head(self.features(tokens, hidden))  # [B, N, V]
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
    segs = cfg.ef_segments(n)
    ef_tokens = sum(e - s for s, e in segs)  # N + (K-1)*O
    ef_sq = sum((e - s) ** 2 for s, e in segs)
    matmul = 6 * _block_matmul_params(cfg) * (2 * n + cfg.ef_cycles * ef_tokens) + 6 * cfg.vocab_size * cfg.d_model * n
    attn = 12 * cfg.num_heads * cfg.head_dim * (2 * n * n + cfg.ef_cycles * ef_sq)
    return (matmul + attn) / n


def model_summary(config: ModelConfig, seq_len: int) -> str:
    """A few lines for ``train --dry-run``: parameters, FLOPs per token, the EF segment layout."""
    cfg = config
    s, o = cfg.segment_layout(seq_len)
    segs = cfg.ef_segments(seq_len)
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
