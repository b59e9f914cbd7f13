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

import contextlib
import contextvars
import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

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
    rope_scaling: float = 1.0  # the context-extension factor s of rope_scaling_type (1 = none)
    # How rope_scaling extends the context: "linear" position interpolation (positions / s, Chen et
    # al. 2023) or "yarn" (Peng et al. 2023: only the pairs that turn too few times over the
    # original context are interpolated, and q, k are scaled by an attention temperature).
    rope_scaling_type: Literal["linear", "yarn"] = "linear"
    rope_original_max_len: Optional[int] = None  # yarn: the context length trained at before extension
    rope_yarn_beta_fast: float = 32.0  # yarn: pairs turning > beta_fast times over it keep their frequency
    rope_yarn_beta_slow: float = 1.0  # yarn: pairs turning < beta_slow times are fully interpolated
    rope_yarn_attn_factor: Optional[float] = None  # yarn: q and k scale sqrt(1/t); None = 0.1 ln(s) + 1
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-5
    # QK-norm (a stability switch of long-context recipes): RMSNorm over head_dim of every head's
    # query and key, before RoPE, so attention logits cannot grow with the q/k weights' scale.
    qk_norm: bool = False
    # EF segment layout revision (spec revision 2: K = ceil(N / T), prefix-consistent). Recorded in
    # every checkpoint and export; a checkpoint without it predates revision 2 (see validate).
    layout_revision: int = 2
    # Document masking: every attention (the full blocks and each EF segment) sees only its own
    # document. Documents are read off the tokens: `prepare` appends eos_id to every document, so a
    # document is a run of tokens ending with EOS (the EOS belongs to the document it ends; a row's
    # first tokens, continuing a document of the previous row, are a document of their own). No
    # document ids in the shards, no format change. The EF segment layout stays global (kT).
    doc_masking: bool = False
    doc_position_reset: bool = False  # positions restart at 0 in every document (needs doc_masking)
    eos_id: int = 3  # the EOS id ending documents (3 in tokenizers prepare trains; manifest tokenizer.eos_id)

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
        self._validate_yarn(bad)
        if self.doc_position_reset and not self.doc_masking:
            raise bad("doc_position_reset", True, "needs model.doc_masking=true (positions restarting in a document "
                      "that attends across documents would repeat positions in one context)")
        if self.doc_masking and not 0 <= self.eos_id < self.vocab_size:
            raise bad("eos_id", self.eos_id, f"model.doc_masking=true needs the tokenizer's EOS id, in [0, "
                      f"vocab_size={self.vocab_size}) (the dataset manifest's tokenizer.eos_id)")
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

    def _validate_yarn(self, bad: Callable[[str, object, str], ConfigError]) -> None:
        if self.rope_scaling_type != "yarn":
            return
        if self.rope_scaling < 1:
            raise bad("rope_scaling", self.rope_scaling, "must be >= 1 with rope_scaling_type='yarn' (it extends "
                      "the context; use 'linear' to compress positions)")
        if not isinstance(self.rope_original_max_len, int) or self.rope_original_max_len <= 0:
            raise bad("rope_original_max_len", self.rope_original_max_len, "rope_scaling_type='yarn' needs the "
                      "context length the model was trained at before extension, a positive number of tokens")
        if not 0 < self.rope_yarn_beta_slow < self.rope_yarn_beta_fast:
            raise bad("rope_yarn_beta_slow", self.rope_yarn_beta_slow,
                      f"must satisfy 0 < rope_yarn_beta_slow < rope_yarn_beta_fast={self.rope_yarn_beta_fast}")
        if self.rope_yarn_attn_factor is not None and self.rope_yarn_attn_factor <= 0:
            raise bad("rope_yarn_attn_factor", self.rope_yarn_attn_factor, "must be positive or null (0.1 ln(s) + 1)")

    @property
    def rope_key(self) -> tuple:
        """Everything the RoPE factors depend on besides the positions: a model drops its cached EF
        plans when it changes, so new RoPE settings on a live model (a context-extension phase)
        never reuse factors computed for the old ones."""
        return (self.pos_encoding, self.head_dim, self.rope_theta, self.rope_scaling, self.rope_scaling_type,
                self.rope_original_max_len, self.rope_yarn_beta_fast, self.rope_yarn_beta_slow,
                self.rope_yarn_attn_factor)

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


def yarn_inv_freq(inv_freq: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN's per-pair frequencies and q/k scale (Peng et al. 2023, "NTK-by-parts" + temperature),
    computed as the authors' reference code (and transformers' ``rope_type: yarn``) does.

    Pair j of frequency w_j turns r_j = L0 w_j / 2pi times over the original context L0. Pairs with
    r_j > beta_fast (high frequencies: local order) keep w_j, pairs with r_j < beta_slow are
    interpolated to w_j / s, and a linear ramp over the pair index lies between (its ends rounded
    out to whole pairs). The magnitude ``mscale`` multiplies q and k, so logits scale by mscale^2
    = 1/t with sqrt(1/t) = 0.1 ln(s) + 1 unless ``rope_yarn_attn_factor`` sets it.
    """
    s, hd, l0, base = cfg.rope_scaling, cfg.head_dim, cfg.rope_original_max_len, cfg.rope_theta
    mscale = cfg.rope_yarn_attn_factor if cfg.rope_yarn_attn_factor is not None else (
        0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
    if s == 1:  # interpolation = extrapolation: exactly plain RoPE (no rounding through the ramp)
        return inv_freq, mscale

    def pair(turns: float) -> float:  # the pair index whose wavelength fits ``turns`` times into L0
        return hd * math.log(l0 / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(pair(cfg.rope_yarn_beta_fast)), 0), min(math.ceil(pair(cfg.rope_yarn_beta_slow)), hd - 1)
    if low == high:
        high += 0.001  # one-pair ramp: a step, without dividing by zero
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    return inv_freq / s * ramp + inv_freq * (1 - ramp), mscale


def rope_freqs(positions: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """exp(i * position * theta^(-2j/hd)), complex64 [*positions.shape, head_dim/2] (Su et al. 2021).

    ``rope_scaling`` s > 1 extends the context: ``rope_scaling_type`` "linear" is position
    interpolation (Chen et al. 2023), positions / s; "yarn" changes the frequencies per pair and
    the factors' magnitude (``yarn_inv_freq``). s = 1 is plain RoPE for both.
    """
    hd = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd)
    if cfg.rope_scaling_type == "yarn":
        inv_freq, mscale = yarn_inv_freq(inv_freq, cfg)
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., hd/2]
        return torch.polar(torch.full_like(angles, mscale), angles)
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
# Document masking's masks: a bool [b, 1, L, L] tensor (True = may attend), or a FlexAttention
# BlockMask of the same rule for the full blocks at large N (see doc_mask_flex).
AttnMask = Union[torch.Tensor, BlockMask]
# (q [b, H, L, hd], k, v [b, Hkv, L, hd], dropout_p, gqa) -> [b, H, L, hd]: context parallelism's attention
ContextAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], torch.Tensor]


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
        # QK-norm per head (Qwen3, Gemma 3; OLMo-2 normalises the whole H*hd projection instead):
        # one weight [hd] shared by the heads. RMSNorm whatever ``cfg.norm`` is: the aim is to bound
        # |q|, |k| and so the attention logits; a LayerNorm's centring and bias would only move the
        # vectors RoPE rotates. None when off: no parameters, the forward unchanged bit for bit.
        self.q_norm = nn.RMSNorm(self.hd, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.hd, eps=cfg.norm_eps) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, L, D] -> q [b, H, L, hd], k and v [b, Hkv, L, hd], QK-norm (if on) and RoPE applied."""
        b, L, d = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(b, L, self.n_heads, self.hd).transpose(1, 2)  # [b, H, L, hd]
        k = k.view(b, L, self.n_kv, self.hd).transpose(1, 2)  # [b, Hkv, L, hd]
        v = v.view(b, L, self.n_kv, self.hd).transpose(1, 2)  # [b, Hkv, L, hd]
        if self.q_norm is not None:  # before RoPE: the rotation keeps the norm, so |q|, |k| stay bounded
            q, k = self.q_norm(q), self.k_norm(k)  # over hd, per head and position
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Rope, kv: Optional[KVSlot] = None,
                mask: Optional[AttnMask] = None, context: Optional[ContextAttention] = None) -> torch.Tensor:
        """``mask``: document masking's causal same-document mask, [b, 1, L, L] bool (True = may
        attend) through SDPA or a BlockMask through FlexAttention; None is plain causal attention
        (is_causal: the flash / fused kernels). ``context``:
        context parallelism's attention over the whole sequence for this rank's queries
        (sequence_shard.GatheredAttention: it gathers the other ranks' keys and values)."""
        b, L, d = x.shape  # [b, L, D]
        q, k, v = self.project(x, rope)
        gqa = self.n_kv != self.n_heads
        if context is not None:
            y = context(q, k, v, self.dropout if self.training else 0.0, gqa)  # [b, H, L, hd]
        elif isinstance(mask, BlockMask):
            y = flex_attend(q, k, v, mask, self.dropout if self.training else 0.0, gqa)  # [b, H, L, hd]
        elif kv is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=mask is None, enable_gqa=gqa)  # [b, H, L, hd]
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

    def forward(self, x: torch.Tensor, rope: Rope = None, kv: Optional[KVSlot] = None,
                mask: Optional[AttnMask] = None, context: Optional[ContextAttention] = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, kv, mask, context)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, kv, mask, context))
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
    # Context parallelism's chunk plans (sequence_shard.build_chunk_plan): the first local segment
    # is a global odd one (so B runs the local even batch and A the odd one), and the outputs are
    # partial sums of a chunk, weighted even when one segment holds the whole chunk.
    odd_first: bool = False
    partial: bool = False


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


def segment_batches(h: torch.Tensor, plan: EFPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """h [B, N, C] -> the EF cycle's batches: even segments [B*K_even, P, C], odd ones [B*K_odd, P, C].
    A pad, a view and a slice (see EFPlan), no gather; padding slots hold zeros."""
    b, _, c = h.shape
    t, p, ke, ko = plan.stride, plan.pad, plan.k_even, plan.k_odd
    hp = _fit(h, max(ke, ko + 1) * 2 * t)  # [B, span, C]
    even = hp[:, :ke * 2 * t].view(b, ke, 2 * t, c)[:, :, :p].reshape(b * ke, p, c)
    odd = hp[:, t:t + ko * 2 * t].view(b, ko, 2 * t, c)[:, :, :p].reshape(b * ko, p, c)
    return even, odd


# ---------------------------------------------------------------------------------------------
# Document masking (model.doc_masking): masks and positions, built once per forward from the tokens.

def document_ids(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, N] -> (doc [B, N], pos [B, N]): each token's document index in its row and its
    position inside that document.

    A document ends with its EOS, so doc[p] counts the EOS strictly before p; the tokens before a
    row's first EOS (the tail of a document begun in an earlier row) are document 0, on their own.
    """
    eos = tokens == eos_id  # [B, N]
    doc = eos.long().cumsum(1) - eos.long()  # [B, N]: EOS strictly before p
    idx = torch.arange(tokens.shape[1], device=tokens.device)
    starts = F.pad(eos[:, :-1], (1, 0), value=True)  # [B, N]: a document starts at 0 and after each EOS
    start = torch.where(starts, idx, 0).cummax(1).values  # [B, N]: its document's first position
    return doc, idx - start


def same_document_causal(doc: torch.Tensor, a: int = 0, b: Optional[int] = None) -> torch.Tensor:
    """doc [B, L] (non-decreasing) -> [B, 1, b - a, b] bool for queries [a, b) against keys [0, b):
    query a + i may attend key j <= a + i of its document (a = 0, b = L: the square mask; a > 0: a
    context-parallel chunk's, lower-right aligned; ``document_block_mask`` is the same rule)."""
    b = doc.shape[1] if b is None else b
    causal = torch.ones(b - a, b, dtype=torch.bool, device=doc.device).tril(diagonal=a)  # [b - a, b]
    return ((doc[:, a:b, None] == doc[:, None, :b]) & causal)[:, None]


# The full blocks' mask has two forms. A bool [B, 1, N, N] tensor is simple and exact anywhere, but
# at N = 32K it is 1 GiB per row and moves SDPA off its flash kernels (to a masked one that reads
# it). A FlexAttention BlockMask stores only which 128 x 128 tiles are empty, full or partial (the
# rule itself is a function of the document ids, evaluated inside a fused kernel), and skips the
# empty tiles: every pair of different documents. The rule, per forward pass:
#   FlexAttention when the tokens are on CUDA and N >= DOC_MASK_FLEX_MIN_LEN, boolean masks otherwise,
# and boolean masks whenever attention dropout applies (training with model.dropout > 0): FlexAttention
# has no dropout. EF segments always keep their bool [P, P] masks (P <= S: small, and SDPA is fast on them).
DOC_MASK_FLEX_MIN_LEN = 2048
# "auto": the rule above. "on": FlexAttention at every N on every device (tests, benchmarks; on the CPU
# it runs eager and forward only: torch has no FlexAttention backward there). "off": boolean masks only.
# The environment variable SLAM_DOC_MASK_FLEX sets it for a process (and the ranks it spawns).
DOC_MASK_FLEX = os.environ.get("SLAM_DOC_MASK_FLEX", "auto")
_FLEX_COMPILED: Optional[tuple[Callable[..., BlockMask], Callable[..., torch.Tensor]]] = None


def doc_mask_flex(n: int, device: torch.device, dropout: float) -> bool:
    """Whether document masking's full attention over sequences of n tokens on ``device`` uses
    FlexAttention (see DOC_MASK_FLEX); ``dropout``: the attention dropout of this forward pass."""
    if DOC_MASK_FLEX not in ("auto", "on", "off"):
        raise UserError(f"SLAM_DOC_MASK_FLEX={DOC_MASK_FLEX!r} is invalid: auto, on or off")
    if dropout > 0 or DOC_MASK_FLEX == "off":
        return False
    return DOC_MASK_FLEX == "on" or (device.type == "cuda" and n >= DOC_MASK_FLEX_MIN_LEN)


def flex_functions(device: torch.device) -> tuple[Callable[..., BlockMask], Callable[..., torch.Tensor]]:
    """(create_block_mask, flex_attention) for tensors on ``device``. On CUDA both are compiled,
    once per process on first use: compiled, flex_attention is one fused kernel and
    create_block_mask never builds the dense mask. Eager, both materialise [B, H, L, N] (the mask,
    the scores): fine for the CPU tests of the masks' meaning, and torch warns."""
    global _FLEX_COMPILED
    if device.type != "cuda":
        return create_block_mask, flex_attention
    if _FLEX_COMPILED is None:  # automatic dynamic shapes: changing lengths do not compile once each
        _FLEX_COMPILED = torch.compile(create_block_mask), torch.compile(flex_attention)
    return _FLEX_COMPILED


def document_block_mask(doc: torch.Tensor, a: int = 0, b: Optional[int] = None) -> BlockMask:
    """doc [B, N] -> the BlockMask of queries [a, b) against keys [0, b), query a + i seeing key
    j <= a + i of its document: the full blocks' mask (a = 0, b = N), or a context-parallel chunk's
    (same_document_causal's rule, lower-right aligned when a > 0)."""
    b = doc.shape[1] if b is None else b
    make, _ = flex_functions(doc.device)

    def same_document_causal_mod(row, head, q, k):  # indices: q in [0, b - a), k in [0, b); any head
        return (doc[row, a + q] == doc[row, k]) & (k <= a + q)

    return make(same_document_causal_mod, doc.shape[0], None, b - a, b, device=doc.device)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, dropout: float,
                gqa: bool) -> torch.Tensor:
    """q [b, H, L, hd], k/v [b, Hkv, Lk, hd] -> [b, H, L, hd] under ``mask`` (SDPA's scale 1/sqrt(hd))."""
    if dropout > 0:  # doc_mask_flex chose boolean masks for this case; a BlockMask here is a bug
        raise RuntimeError("FlexAttention has no dropout: document masking must use boolean masks with dropout > 0")
    _, attend = flex_functions(q.device)
    return attend(q, k, v, block_mask=mask, enable_gqa=gqa)


@dataclass
class DocMasks:
    """What document masking changes in one forward pass (the EFPlan's RoPE otherwise).

    Boolean masks are small where SLAM does most of its attention: per EF segment they are
    [P, P] (P <= S), slices of the row's document ids cut like the segments; only the full blocks'
    mask is [N, N], or a BlockMask at large N (see doc_mask_flex). The diagonal is always allowed,
    so no row is fully masked (padding slots included: their outputs are never read).
    """

    # The initial and final blocks' mask: bool [B, 1, N, N] or a BlockMask of it. None under context
    # parallelism when no attention reads it (the chunk's full attention is GatheredAttention's).
    full: Optional[AttnMask]
    even: Optional[AttnMask]  # [B*K_even, 1, P, P] bool, one per even segment (``full`` when P = N)
    odd: Optional[AttnMask]  # [B*K_odd, 1, P, P] bool
    pos: Optional[torch.Tensor]  # [B, N] positions restarting per document (doc_position_reset), else None
    rope_full: Rope  # [B, 1, N, hd/2]: each row's own factors when positions restart; else plan.rope_full
    rope_even: Rope  # [B*K_even, 1, P, hd/2], or plan.rope_even
    rope_odd: Rope  # [B*K_odd, 1, P, hd/2], or plan.rope_odd


def build_doc_masks(cfg: ModelConfig, plan: EFPlan, tokens: torch.Tensor, flex: bool = False) -> DocMasks:
    """The DocMasks of ``tokens`` [B, N] under cfg.doc_masking (and cfg.doc_position_reset); ``flex``:
    the full blocks' mask as a BlockMask (doc_mask_flex), never building the [B, 1, N, N] tensor."""
    doc, pos = document_ids(tokens, cfg.eos_id)
    full = document_block_mask(doc) if flex else same_document_causal(doc)
    return doc_masks_from_ids(cfg, plan, doc, pos, full)


def doc_masks_from_ids(cfg: ModelConfig, plan: EFPlan, doc: torch.Tensor, pos: torch.Tensor,
                       full: Optional[AttnMask]) -> DocMasks:
    """The DocMasks of the positions ``plan`` covers, from their document ids and in-document
    positions (``document_ids``), each [B, plan.n]. ``full``: the caller's mask for attention over
    all of them, or None where none reads it (a context-parallel chunk: GatheredAttention has its
    own); when one EF segment holds them all it is that segment's mask too (built here if None)."""
    if plan.k_odd == 0:  # one segment holds the sequence (P = N): it is the full blocks' mask
        full = even = odd = same_document_causal(doc) if full is None else full
    else:
        doc_even, doc_odd = segment_batches(doc[:, :, None], plan)  # [B*K, P, 1]: slices of doc
        even, odd = same_document_causal(doc_even[..., 0]), same_document_causal(doc_odd[..., 0])
    masks = DocMasks(full, even, odd, None, plan.rope_full, plan.rope_even, plan.rope_odd)
    if cfg.doc_position_reset:
        masks.pos = pos
        if cfg.pos_encoding == "rope":  # per-token factors: each row has its own positions
            masks.rope_full = rope_freqs(pos, cfg)[:, None]  # [B, 1, N, hd/2]
            if plan.k_odd:
                pos_even, pos_odd = segment_batches(pos[:, :, None], plan)  # [B*K, P, 1]
                masks.rope_even, masks.rope_odd = (rope_freqs(q[..., 0], cfg)[:, None] for q in (pos_even, pos_odd))
    return masks


# ---------------------------------------------------------------------------------------------
# The model.

Wrapper = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor]
PLAN_CACHE_SIZE = 8  # EF plans kept (LRU): generation and eval see many lengths, training one
INIT_BLOCK = 1 << 20  # elements per independently seeded block of a parameter's initial values
_DEFERRED_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("slam_deferred_init", default=False)


@contextlib.contextmanager
def deferred_init() -> Iterator[None]:
    """Models built inside skip ``init_weights`` in their constructor: the caller initialises them
    after sharding (meta-device construction, DeepSpeed ``zero.Init``), when the parameters hold
    no values yet or only this rank's partition."""
    token = _DEFERRED_INIT.set(True)
    try:
        yield
    finally:
        _DEFERRED_INIT.reset(token)


def _block_generator(seed: int, name: str, block: int) -> torch.Generator:
    # A stable hash (not Python's hash(), which is salted per process) of what identifies the block.
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little"))


def fill_flat(flat: torch.Tensor, start: int, values: Callable[[int, int], torch.Tensor]) -> None:
    """Fill the 1-D ``flat`` (elements [start, start + len) of a parameter's flattened full tensor)
    with ``values(a, b)``, in pieces aligned to the generator blocks: each block is drawn once and
    no full-size temporary exists."""
    pos, end = start, start + flat.numel()
    while pos < end:
        nxt = min((pos // INIT_BLOCK + 1) * INIT_BLOCK, end)
        flat[pos - start:nxt - start].copy_(values(pos, nxt))
        pos = nxt


def write_initial(p: torch.Tensor, values: Callable[[int, int], torch.Tensor]) -> None:
    """Fill parameter ``p`` with the flat elements ``values(start, end)`` of its full tensor.
    ``p`` may be plain (any device; meta is skipped: nothing to write) or an FSDP2 DTensor sharded
    by rows on a 1-D mesh, whose local rows are one contiguous flat range of the full tensor (no
    communication: every rank computes its own rows)."""
    if p.is_meta:
        return
    start, local = 0, p
    if hasattr(p, "placements"):  # a DTensor: this rank's shard
        from torch.distributed.tensor import Replicate, Shard

        local = p.to_local()
        if p.device_mesh.ndim != 1 or not isinstance(p.placements[0], (Shard, Replicate)) or (
                isinstance(p.placements[0], Shard) and p.placements[0].dim != 0):
            raise NotImplementedError(f"init_weights: placements {p.placements} on a {p.device_mesh.ndim}-D mesh "
                                      "(only row sharding on a 1-D mesh is supported)")
        if isinstance(p.placements[0], Shard):
            rows, offset = Shard.local_shard_size_and_offset(p.shape[0], p.device_mesh.size(),
                                                             p.device_mesh.get_local_rank())
            if rows != local.shape[0]:
                raise RuntimeError(f"unexpected local shard of {tuple(p.shape)}: {tuple(local.shape)}")
            start = offset * (p.numel() // p.shape[0] if p.shape[0] else 0)
    fill_flat(local.view(-1), start, values)


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
        # z-loss coefficient, set by the training wiring from train.z_loss (a property of the
        # objective, not of the architecture: no ModelConfig field, nothing in exports). 0 = off.
        self.z_loss: float = 0.0
        self.z_loss_stats: Optional[torch.Tensor] = None  # [2] fp64: sum of lse^2, tokens (see _z_term)
        self._plans: OrderedDict[tuple, EFPlan] = OrderedDict()
        # Context parallelism (set by the engine, slam_pretrain/engine/context_parallel.py): this
        # rank computes only its chunks of every sequence (model/sequence_shard.py). None: all of it.
        self.sequence_shard = None
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # The parameters init_weights owns: every one this constructor made (a tied weight once);
        # a subclass initialises what it adds after (a classification head).
        self._trunk_params = frozenset(name for name, _ in self.named_parameters())
        if not _DEFERRED_INIT.get():
            self.init_weights()

    # -- initialisation ----------------------------------------------------------------------
    # Every parameter's initial value is a pure function of (seed, parameter name, element index):
    # the flat tensor is cut into INIT_BLOCK-element blocks, each drawn from its own CPU generator
    # seeded by a hash of (seed, name, block). A rank that holds only a slice of a parameter (an
    # FSDP2 row shard, a ZeRO-3 flat partition: both contiguous ranges of the flat tensor) draws
    # only the blocks it overlaps and gets exactly the values of the unsharded model, whatever the
    # world size, without ever holding the whole parameter. (Before this scheme the weights came
    # from one global-RNG stream in module order, which a shard cannot reproduce: the same seed
    # now gives other, equally distributed, initial weights than before.)

    def init_spec(self, name: str) -> tuple[str, float]:
        """How parameter ``name`` starts: ("normal", std), ("ones", 0) or ("zeros", 0).

        N(0, init_std) for linear and embedding weights; residual output projections (attention
        ``proj``, FFN ``down``) N(0, init_std / sqrt(2 * depth)), depth = blocks on a token's path
        (ef_cycles + 2), as GPT-2; norm weights 1, norm biases 0.
        """
        cfg = self.config
        owner_name, _, leaf = name.rpartition(".")
        owner = self.get_submodule(owner_name)
        if isinstance(owner, (nn.Linear, nn.Embedding)) and leaf == "weight":
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                return "normal", cfg.init_std / math.sqrt(2 * (cfg.ef_cycles + 2))
            return "normal", cfg.init_std
        if isinstance(owner, (nn.LayerNorm, nn.RMSNorm)) and leaf in ("weight", "bias"):
            return ("ones" if leaf == "weight" else "zeros"), 0.0
        raise TypeError(f"no initialisation rule for parameter {name!r} ({type(owner).__name__}.{leaf})")

    def initial_values(self, name: str, start: int, end: int, seed: int) -> torch.Tensor:
        """Elements [start, end) of parameter ``name``'s flattened initial value: fp32, on the CPU."""
        kind, std = self.init_spec(name)
        if kind != "normal":
            return torch.full((end - start,), 1.0 if kind == "ones" else 0.0, device="cpu")
        p = self.get_parameter(name)
        numel = getattr(p, "ds_numel", p.numel())  # ds_numel: partitioned by zero.Init (p holds nothing)
        if not 0 <= start <= end <= numel:
            raise ValueError(f"initial_values({name!r}): [{start}, {end}) is outside its {numel} elements")
        out = torch.empty(end - start, device="cpu")
        pos = start
        while pos < end:
            block = pos // INIT_BLOCK
            lo = block * INIT_BLOCK
            # Always the whole block: normal_ draws differently for different lengths (vectorised
            # in groups of 16, scalar below 16), so a prefix of a longer draw is not a shorter draw.
            vals = torch.empty(min(INIT_BLOCK, numel - lo), device="cpu").normal_(
                0.0, std, generator=_block_generator(seed, name, block))
            hi = min(lo + vals.numel(), end)
            out[pos - start:hi - start] = vals[pos - lo:hi - lo]
            pos = hi
        return out

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """(Re)initialise every parameter from ``seed`` (default: ``torch.initial_seed()``, the
        seed of the last ``torch.manual_seed``) as ``initial_values`` says. Works in place on plain
        parameters on any device and on FSDP2 DTensor shards (each rank writes its own rows); meta
        parameters are left alone. Also (re)ties lm_head to the embedding."""
        seed = torch.initial_seed() if seed is None else seed
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight
        for name, p in self.named_parameters():  # a tied weight once, under its first name (tok_emb)
            if name in self._trunk_params:  # init_spec raises for a kind it has no rule for
                write_initial(p, lambda a, b, name=name: self.initial_values(name, a, b, seed))

    def ef_plan(self, n: int, device: torch.device) -> EFPlan:
        """The plan for length n, from a small LRU cache (memory does not grow with lengths seen)."""
        return self._cached_plan((n, str(device)), lambda: build_ef_plan(self.config, n, device))

    def chunk_plan(self, n: int, a: int, b: int, device: torch.device) -> EFPlan:
        """Context parallelism: the plan of chunk [a, b) of a length-n sequence (same LRU cache)."""
        from slam_pretrain.model.sequence_shard import build_chunk_plan

        return self._cached_plan((n, a, b, str(device)), lambda: build_chunk_plan(self.config, n, a, b, device))

    def _cached_plan(self, key: tuple, build: Callable[[], EFPlan]) -> EFPlan:
        if getattr(self, "_plans_rope", None) != self.config.rope_key:
            # New RoPE settings on this model (a context-extension phase): every cached plan holds
            # factors of the old ones, so none may be reused.
            self._plans.clear()
            self._plans_rope = self.config.rope_key
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build()
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _ef_cycle(self, i: int, plan: EFPlan, x: torch.Tensor, docs: Optional[DocMasks] = None) -> torch.Tensor:
        """One EF cycle: A on even segments, B on odd ones (one call each), fusion mean. x [B, N, D].
        ``docs``: document masking's per-segment masks (and RoPE factors), else plain causal."""
        rope_full, rope_even, rope_odd = (plan.rope_full, plan.rope_even, plan.rope_odd) if docs is None else (
            docs.rope_full, docs.rope_even, docs.rope_odd)
        # Even batch to A, odd to B (swapped in a context-parallel chunk that starts at an odd segment).
        block_even, block_odd = ((self.ef_blocks_B[i], self.ef_blocks_A[i]) if plan.odd_first
                                 else (self.ef_blocks_A[i], self.ef_blocks_B[i]))
        if plan.k_odd == 0:  # one segment holds the whole sequence (or chunk)
            y = block_even(x, rope_full, mask=None if docs is None else docs.full)
            return y * plan.weight.to(y.dtype) if plan.partial else y
        b, n, d = x.shape
        t, p, ke, ko = plan.stride, plan.pad, plan.k_even, plan.k_odd
        span = max(ke, ko + 1) * 2 * t  # room for both batches' periods (odd ones start at T)

        def periods(h: torch.Tensor, start: int, k: int) -> torch.Tensor:  # [B, k, 2T, D] view of h
            return h[:, start:start + k * 2 * t].view(b, k, 2 * t, d)

        xe, xo = segment_batches(x, plan)  # [B*K_even, P, D], [B*K_odd, P, D]: zero padding past N
        ye = block_even(xe, rope_even, mask=None if docs is None else docs.even).view(b, ke, p, d)
        yo = block_odd(xo, rope_odd, mask=None if docs is None else docs.odd).view(b, ko, p, d)
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
        if self.sequence_shard is not None:
            return self._sharded_features(tokens, hidden)
        plan = self.ef_plan(n, tokens.device)
        # Document masking: masks (and per-row positions) from the tokens, once for every block.
        docs = None
        if cfg.doc_masking:
            flex = doc_mask_flex(n, tokens.device, cfg.dropout if self.training else 0.0)
            docs = build_doc_masks(cfg, plan, tokens, flex)
        x = self.tok_emb(tokens)  # [B, N, D]
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(n, device=tokens.device) if docs is None or docs.pos is None else docs.pos)
        x = self.drop(x)
        rope_full, full_mask = (plan.rope_full, None) if docs is None else (docs.rope_full, docs.full)
        return self._trunk(x, lambda block, h: block(h, rope_full, mask=full_mask),
                           lambda i, h: self._ef_cycle(i, plan, h, docs), hidden)

    def _trunk(self, x: torch.Tensor, full: Callable[[nn.Module, torch.Tensor], torch.Tensor],
               cycle: Callable[[int, torch.Tensor], torch.Tensor], hidden: Optional[list[torch.Tensor]]) -> torch.Tensor:
        """The stages on the embedded x: initial block, EF cycles, final block, final norm.
        ``full(block, h)`` runs a full block and ``cycle(i, h)`` EF cycle i (whole sequences, or this
        rank's chunks); the engine's wrappers (activation checkpointing) wrap each stage, and each
        stage's input goes to ``hidden``."""

        def run(wrapper: Optional[Wrapper], fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
            if hidden is not None:
                hidden.append(x)
            return fn(x) if wrapper is None else wrapper(fn, x)

        x = run(self.block_wrapper, lambda h: full(self.initial_block, h), x)
        for i in range(self.config.ef_cycles):
            x = run(self.cycle_wrapper, lambda h, i=i: cycle(i, h), x)
        x = run(self.block_wrapper, lambda h: full(self.final_block, h), x)
        return self.norm_f(x)

    def _sharded_features(self, tokens: torch.Tensor, hidden: Optional[list[torch.Tensor]]) -> torch.Tensor:
        """``features`` under context parallelism: tokens [B, N] (the whole rows, on every rank of
        the group) -> this rank's positions only, [B, 2C, D] (model/sequence_shard.py)."""
        from slam_pretrain.model import sequence_shard as cp

        fwd, idx, row_pos = cp.prepare(self, tokens)
        x = self.tok_emb(tokens[:, idx])  # [B, 2C, D]
        if self.pos_emb is not None:
            x = x + self.pos_emb(idx if row_pos is None else row_pos)
        x = self.drop(x)
        rope = cp.rope_for(self.config, idx, row_pos)
        return self._trunk(x, lambda block, h: block(h, rope, context=fwd.attention),
                           lambda i, h: cp.ef_cycle(self, i, h, fwd), hidden)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                hidden: Optional[list[torch.Tensor]] = None):
        """tokens [B, N] -> logits [B, N, V], or (logits, mean CE loss) when targets are given
        (``hidden``: see ``features``). With ``self.z_loss`` > 0 in training mode the loss's
        gradient also holds the z-loss, while its value stays the CE (see ``_z_term``)."""
        logits = self.lm_head(self.features(tokens, hidden))  # [B, N, V] ([B, 2C, V] under context parallelism)
        if targets is None:
            return logits
        denom = None
        if self.sequence_shard is not None:  # this rank's targets; the loss is a share of the row's mean
            targets, denom = self.sequence_shard.local_targets(targets)
        flat, targets = logits.float().view(-1, logits.size(-1)), targets.reshape(-1)  # [B*N, V], [B*N]
        if denom is None:
            loss = F.cross_entropy(flat, targets, ignore_index=-100)
        else:
            loss = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum") / denom
        if self.z_loss and self.training:
            loss = loss + self._z_term(flat, targets, denom)
        return logits, loss

    def _z_term(self, flat: torch.Tensor, targets: torch.Tensor, denom: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The z-loss (PaLM, Chowdhery et al. 2022): z_loss * mean(logsumexp(logits)^2) over the
        tokens whose target is not -100. It pulls log Z towards 0 so the softmax normaliser cannot
        drift (large logits lose precision in bf16 and blow up late in long runs).

        Returned as ``z - z.detach()``: exactly 0 in value, the z-loss's gradient in backward. So
        the engines back-propagate CE + z-loss, while the loss they return and the trainer logs
        stays the plain CE, comparable with runs without it (metrics.jsonl reports the z-term
        apart, as ``z_loss``). A non-finite z makes the loss NaN (inf - inf) and the step is
        skipped like any non-finite one. The detached sum of lse^2 and the token count add up in
        ``z_loss_stats`` until the logging callback takes them (``pop_z_loss_stats``)."""
        keep = targets != -100  # [B*N]
        lse2 = torch.where(keep, torch.logsumexp(flat, dim=-1), 0.0).square()  # [B*N]; 0 where ignored
        count = keep.sum()
        z = self.z_loss * lse2.sum() / (count.clamp(min=1) if denom is None else denom)
        stats = torch.stack([lse2.sum().detach(), count.to(lse2.dtype)]).double()  # no host sync
        self.z_loss_stats = stats if self.z_loss_stats is None else self.z_loss_stats + stats
        return z - z.detach()

    def pop_z_loss_stats(self) -> Optional[torch.Tensor]:
        """[sum of lse^2, tokens] over the training forwards since the last call (None: none ran)."""
        stats, self.z_loss_stats = self.z_loss_stats, None
        return stats


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
    qk_norm = 2 * cfg.head_dim if cfg.qk_norm else 0  # q_norm and k_norm weights per attention
    blocks = (2 + 2 * cfg.ef_cycles) * (_block_matmul_params(cfg) + 2 * norm + qk_norm) + norm  # + norm_f
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
        f"{cfg.norm_position}-norm {cfg.norm} {cfg.ffn} {cfg.pos_encoding} tie_embeddings={cfg.tie_embeddings}"
        f"{' qk_norm' if cfg.qk_norm else ''}",
        f"  FLOPs per token (fwd+bwd) at seq_len {seq_len}: {fpt:.4g} ({fpt * seq_len:.4g} per sequence)",
        f"  EF segments at seq_len {seq_len}: S={s} O={o} stride={s - o if len(segs) > 1 else s} "
        f"K={len(segs)}: {shown}",
    ])
