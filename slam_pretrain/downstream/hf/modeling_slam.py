"""SLAM v1 causal language model for Hugging Face transformers (written by `slam-pretrain export --format hf`).

Self-contained (torch + transformers only): ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` loads it. Module and parameter names are slam-pretrain's own
(``tok_emb``, ``initial_block``, ``ef_blocks_A``/``ef_blocks_B``, ``final_block``, ``norm_f``,
``lm_head``), so the weights map 1:1, and the forward pass is the same computation:

    tokens[B, N] -> embedding -> initial_block (full causal attention + FFN)
                 -> EF cycle 1..ef_cycles: ef_blocks_A[i] on even segments, ef_blocks_B[i] on odd
                    ones, fused by the mean over the segments that hold a position
                 -> final_block -> final norm -> LM head -> logits[B, N, V]

EF segment layout revision 2: stride T = S - O, segment k = [kT, min(kT + S, N)) for every k with
kT < N. With S and O in tokens the model is prefix-consistent (the output at p depends on tokens
0..p only, whatever N is), so an exact KV cache exists: ``SLAMCache``, passed as
``past_key_values`` (``cache`` in transformers >= 5). The initial and final blocks cache every
position; an EF block caches only the segment still open at the newest position, at most S
positions. Fractional layouts (``segment_len: 0.6``) move with N: no cache, generation recomputes
the context for every token (``use_cache`` is ignored).

Padding: rows of a batch may be padded on the left or the right (``attention_mask`` zeros before
and/or after one contiguous run of ones); each row's tokens are computed from position 0 as if it
were alone, and padded positions get zero logits. The context is limited to ``max_seq_len`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_slam import SLAMConfig

try:  # transformers >= 5: initialisers that leave loaded (flagged) weights alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover
    init = nn.init


# The output's cache field: ``cache`` since transformers 5, ``past_key_values`` before.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


# ---------------------------------------------------------------------------------------------
# Segment geometry (identical to slam_pretrain.model).

def segment_layout(cfg: SLAMConfig, n: int) -> tuple[int, int]:
    """(S, O) in tokens at sequence length n. Tokens: as given. Fractions: S = max(1, round(s * n)),
    O = round(o * n) kept below S/2, S raised (never past n) so rounding never adds a segment to
    the exact fractional layout's count; (n, 0) when one segment spans the sequence."""
    seg, ov = cfg.segment_len, cfg.overlap
    if isinstance(seg, float):
        s = max(1, round(seg * n))
        o = min(round(ov * n), (s - 1) // 2)
        k_exact = 1 if seg >= 1.0 else math.ceil((1.0 - ov) / (seg - ov) - 1e-9)
        if n > s:
            s = max(s, o + math.ceil((n - o) / k_exact))
        return (n, 0) if n <= s else (s, o)
    return int(seg), int(ov)


def ef_segments(cfg: SLAMConfig, n: int) -> list[tuple[int, int]]:
    """Segments [start, end): K = ceil(n / T) (revision 2); fractional layouts keep the
    prototype's count K = ceil((n - O) / T), 1 when n <= S."""
    s, o = segment_layout(cfg, n)
    t = s - o
    if cfg.fractional_segments:
        k = 1 if n <= s else -(-(n - o) // t)
    else:
        k = -(-n // t)
    return [(i * t, min(i * t + s, n)) for i in range(k)]


def yarn_inv_freq(inv_freq: torch.Tensor, cfg: SLAMConfig) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023) as the authors' reference code: pairs turning more than beta_fast
    times over the original context keep their frequency, fewer than beta_slow are divided by s, a
    linear ramp over the pair index between; q and k are scaled by mscale (0.1 ln(s) + 1 unless
    ``rope_yarn_attn_factor`` is set). s = 1 is plain RoPE."""
    s, hd, l0, base = cfg.rope_scaling_factor, cfg.head_dim, cfg.rope_original_max_len, cfg.rope_theta
    mscale = cfg.rope_yarn_attn_factor if cfg.rope_yarn_attn_factor is not None else (
        0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
    if s == 1:
        return inv_freq, mscale

    def pair(turns: float) -> float:  # the pair index whose wavelength fits ``turns`` times into l0
        return hd * math.log(l0 / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(pair(cfg.rope_yarn_beta_fast)), 0), min(math.ceil(pair(cfg.rope_yarn_beta_slow)), hd - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    return inv_freq / s * ramp + inv_freq * (1 - ramp), mscale


def rope_freqs(positions: torch.Tensor, cfg: SLAMConfig) -> torch.Tensor:
    """exp(i * position * theta^(-2j/hd)), complex64 [*positions.shape, hd/2], with the context
    extension of ``rope_scaling_type``: "linear" divides positions by ``rope_scaling_factor``,
    "yarn" changes the per-pair frequencies and the factors' magnitude (``yarn_inv_freq``)."""
    hd = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd)
    if cfg.rope_scaling_type == "yarn":
        inv_freq, mscale = yarn_inv_freq(inv_freq, cfg)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        return torch.polar(torch.full_like(angles, mscale), angles)
    angles = (positions.to(torch.float32) / cfg.rope_scaling_factor)[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [b, h, L, hd] by freqs [k, 1, L, hd/2] (b = B * k), in fp32."""
    k = freqs.shape[0]
    xc = torch.view_as_complex(x.float().reshape(-1, k, *x.shape[1:-1], x.shape[-1] // 2, 2))
    return torch.view_as_real(xc * freqs).reshape(x.shape).type_as(x)


def make_norm(cfg: SLAMConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


@dataclass
class KVSlot:
    """One attention layer's buffers while decoding: the new token of row b goes to slot
    ``index[b]`` and attends to the slots <= index[b]; ``length`` = max(index) + 1."""

    k: torch.Tensor  # [B, Hkv, C, hd]
    v: torch.Tensor  # [B, Hkv, C, hd]
    index: torch.Tensor  # [B] long
    length: int


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SLAMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        # QK-norm: RMSNorm over head_dim, one weight shared by the heads (whatever ``cfg.norm`` is).
        self.q_norm = nn.RMSNorm(self.hd, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.hd, eps=cfg.norm_eps) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, rope: Optional[torch.Tensor]):
        b, L, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(b, L, self.n_heads, self.hd).transpose(1, 2)  # [b, H, L, hd]
        k = k.view(b, L, self.n_kv, self.hd).transpose(1, 2)  # [b, Hkv, L, hd]
        v = v.view(b, L, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:  # before RoPE, per head and position
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor], kv: Optional[KVSlot] = None) -> torch.Tensor:
        b, L, _ = x.shape
        q, k, v = self.project(x, rope)
        gqa = self.n_kv != self.n_heads
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, enable_gqa=gqa)
        else:  # one new token per row: store its k/v, attend to the row's valid slots
            rows = torch.arange(b, device=x.device)
            kv.k[rows, :, kv.index] = k[:, :, 0]
            kv.v[rows, :, kv.index] = v[:, :, 0]
            valid = torch.arange(kv.length, device=x.device) <= kv.index[:, None]  # [b, length]
            y = F.scaled_dot_product_attention(q, kv.k[:, :, :kv.length], kv.v[:, :, :kv.length],
                                               attn_mask=valid[:, None, None, :], enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(b, L, self.n_heads * self.hd)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    """SwiGLU (gate|up fused in ``up``) or GELU MLP."""

    def __init__(self, cfg: SLAMConfig):
        super().__init__()
        self.swiglu = cfg.ffn == "swiglu"
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.drop(self.down(h))


class EncoderBlock(nn.Module):
    """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))`` residual block."""

    def __init__(self, cfg: SLAMConfig):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.norm2, self.ffn = make_norm(cfg), FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, kv: Optional[KVSlot] = None):
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, kv)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, kv))
        return self.norm2(x + self.ffn(x))

    def keys_values(self, x: torch.Tensor, rope: Optional[torch.Tensor]):
        _, k, v = self.attn.project(self.norm1(x) if self.pre_norm else x, rope)
        return k, v


@dataclass
class EFPlan:
    """The batched EF cycle at one length: even segments are the first S rows of the sequence cut
    into periods of 2T, odd ones the same after a shift of T (S < 2T): a pad and a view, no gather."""

    n: int
    stride: int
    pad: int
    k_even: int
    k_odd: int
    weight: torch.Tensor  # [n, 1]: 1 / (segments holding p)
    rope_full: Optional[torch.Tensor]
    rope_even: Optional[torch.Tensor]
    rope_odd: Optional[torch.Tensor]


def build_ef_plan(cfg: SLAMConfig, n: int, device: torch.device) -> EFPlan:
    segs = ef_segments(cfg, n)
    s, o = segment_layout(cfg, n)
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
    return EFPlan(n, t, pad, (k + 1) // 2, k // 2, (1.0 / count).to(device), rope_full, rope_even, rope_odd)


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    return x[:, :length] if x.shape[1] >= length else F.pad(x, (0, 0, 0, length - x.shape[1]))


def open_segment(pos: torch.Tensor, parity: int, seg: int, stride: int):
    """(is a segment of this parity open at pos [B], its start [B]): the segments holding p are
    k = p // T and, when p - (k - 1) T < S, k - 1; at most one has a given parity."""
    k_hi = pos // stride
    k = torch.where(k_hi % 2 == parity, k_hi, k_hi - 1)
    start = k * stride
    return (k >= 0) & (pos - start < seg), start


# ---------------------------------------------------------------------------------------------
# The cache.

class SLAMCache:
    """Exact KV cache: full blocks [B, Hkv, C, hd] (C grows by doubling up to max_seq_len); each EF
    block one buffer [B, Hkv, S, hd] whose slot j holds position start + j of its open segment.
    ``pos[b]``: the next position of row b; ``seen``: input columns consumed (padding included)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, full, ef, pos: torch.Tensor, seen: int, max_len: int):
        self.full = full  # [initial, final]: (k, v)
        self.ef = ef  # [cycle][A, B]: (k, v)
        self.pos = pos
        self.seen = seen
        self.max_len = max_len

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __len__(self) -> int:
        return 2 + 2 * len(self.ef)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search)."""
        pick = lambda t: t.index_select(0, beam_idx.to(t.device))  # noqa: E731
        self.full = [(pick(k), pick(v)) for k, v in self.full]
        self.ef = [[(pick(k), pick(v)) for k, v in cyc] for cyc in self.ef]
        self.pos = pick(self.pos)

    def ensure_capacity(self, top: int) -> None:
        """Room in the full blocks' buffers for position ``top``."""
        cap = self.full[0][0].shape[2]
        if top < cap:
            return
        new_cap = min(self.max_len, max(2 * cap, top + 1))
        self.full = [tuple(F.pad(t, (0, 0, 0, new_cap - cap)) for t in kv) for kv in self.full]


# ---------------------------------------------------------------------------------------------
# The model.

class SLAMPreTrainedModel(PreTrainedModel):
    config_class = SLAMConfig
    base_model_prefix = "slam"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EncoderBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


class SLAMForCausalLM(SLAMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "tok_emb.weight"}

    def __init__(self, config: SLAMConfig):
        super().__init__(config)
        cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.initial_block = EncoderBlock(cfg)
        self.ef_blocks_A = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.ef_cycles))
        self.ef_blocks_B = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.ef_cycles))
        self.final_block = EncoderBlock(cfg)
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.post_init()

    # -- transformers plumbing ---------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.tok_emb = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is SLAMCache, built by forward itself

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: Optional[SLAMCache] = None,
                                      past_key_values: Optional[SLAMCache] = None, attention_mask=None,
                                      use_cache: Optional[bool] = None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if isinstance(cache, SLAMCache):  # only the columns the cache has not seen
            input_ids = input_ids[:, cache.seen:]
        else:
            cache = None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}

    # -- the computation ---------------------------------------------------------------------
    def _trunk(self, tokens: torch.Tensor, hidden: Optional[list] = None) -> tuple[torch.Tensor, EFPlan]:
        """tokens [B, n] -> the final block's output [B, n, D]; ``hidden`` receives each stage's input."""
        b, n = tokens.shape
        plan = build_ef_plan(self.config, n, tokens.device)
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(n, device=tokens.device))
        x = self.drop(x)

        def run(fn, h):
            if hidden is not None:
                hidden.append(h)
            return fn(h)

        x = run(lambda h: self.initial_block(h, plan.rope_full), x)
        for i in range(self.config.ef_cycles):
            x = run(lambda h, i=i: self._ef_cycle(i, plan, h), x)
        x = run(lambda h: self.final_block(h, plan.rope_full), x)
        return x, plan

    def _ef_cycle(self, i: int, plan: EFPlan, x: torch.Tensor) -> torch.Tensor:
        if plan.k_odd == 0:
            return self.ef_blocks_A[i](x, plan.rope_full)
        b, n, d = x.shape
        t, p, ke, ko = plan.stride, plan.pad, plan.k_even, plan.k_odd
        span = max(ke, ko + 1) * 2 * t

        def periods(h: torch.Tensor, start: int, k: int) -> torch.Tensor:
            return h[:, start:start + k * 2 * t].view(b, k, 2 * t, d)

        xp = _fit(x, span)
        xe = periods(xp, 0, ke)[:, :, :p].reshape(b * ke, p, d)
        xo = periods(xp, t, ko)[:, :, :p].reshape(b * ko, p, d)
        ye = self.ef_blocks_A[i](xe, plan.rope_even).view(b, ke, p, d)
        yo = self.ef_blocks_B[i](xo, plan.rope_odd).view(b, ko, p, d)
        out = ye.new_zeros(b, span, d)
        periods(out, 0, ke)[:, :, :p] = ye
        periods(out, t, ko)[:, :, :p] += yo
        return out[:, :n] * plan.weight.to(out.dtype)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(x))

    def _prefill_cache(self, hidden: list, plan: EFPlan, lengths: list[int]) -> SLAMCache:
        """The cache after right-padded rows of ``lengths`` tokens (hidden: each stage's input)."""
        cfg = self.config
        b, n, _ = hidden[0].shape
        like = hidden[0]

        def buffers(length: int):
            shape = (b, cfg.kv_heads, length, cfg.head_dim)
            return (torch.zeros(shape, dtype=like.dtype, device=like.device),
                    torch.zeros(shape, dtype=like.dtype, device=like.device))

        capacity = min(cfg.max_seq_len, max(2 * n, 64))
        full = []
        for block, h in ((self.initial_block, hidden[0]), (self.final_block, hidden[-1])):
            k_buf, v_buf = buffers(capacity)
            k, v = block.keys_values(h, plan.rope_full)
            k_buf[:, :, :n], v_buf[:, :, :n] = k, v
            full.append((k_buf, v_buf))
        seg, overlap = segment_layout(cfg, n)
        stride = seg - overlap
        nxt = torch.tensor(lengths, device=like.device)
        ef = []
        for i in range(cfg.ef_cycles):
            h = hidden[1 + i]
            cycle = []
            for parity, block in ((0, self.ef_blocks_A[i]), (1, self.ef_blocks_B[i])):
                k_buf, v_buf = buffers(seg)
                is_open, start = open_segment(nxt, parity, seg, stride)
                for r in range(b):  # the open segment's positions [start, next) of each row
                    s0, s1 = int(start[r]), lengths[r]
                    if bool(is_open[r]) and s1 > s0:
                        rope = None if plan.rope_full is None else plan.rope_full[:, :, s0:s1]
                        k, v = block.keys_values(h[r:r + 1, s0:s1], rope)
                        k_buf[r, :, :s1 - s0], v_buf[r, :, :s1 - s0] = k[0], v[0]
                cycle.append((k_buf, v_buf))
            ef.append(cycle)
        return SLAMCache(full, ef, nxt, 0, cfg.max_seq_len)

    def _decode_step(self, cache: SLAMCache, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (tokens [B]) at the cache's positions -> logits [B, V]."""
        cfg = self.config
        pos = cache.pos
        top = int(pos.max())
        if top >= cfg.max_seq_len:
            raise ValueError(f"the context reached max_seq_len={cfg.max_seq_len} tokens; SLAM cannot attend "
                             f"further (start a new context from the last tokens)")
        cache.ensure_capacity(top)
        seg, overlap = segment_layout(cfg, cfg.max_seq_len)
        stride = seg - overlap
        x = self.tok_emb(tokens)[:, None]  # [B, 1, D]
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)[:, None]
        else:
            rope = rope_freqs(pos, cfg)[:, None, None]
        x = self.drop(x)
        x = self.initial_block(x, rope, KVSlot(*cache.full[0], pos, top + 1))
        open_a, start_a = open_segment(pos, 0, seg, stride)
        open_b, start_b = open_segment(pos, 1, seg, stride)
        idx_a, idx_b = (pos - start_a).clamp(0, seg - 1), (pos - start_b).clamp(0, seg - 1)
        len_a, len_b = int(idx_a.max()) + 1, int(idx_b.max()) + 1
        both, only_a = (open_a & open_b)[:, None, None], (open_a & ~open_b)[:, None, None]
        for i in range(cfg.ef_cycles):
            (ka, va), (kb, vb) = cache.ef[i]
            ya = self.ef_blocks_A[i](x, rope, KVSlot(ka, va, idx_a, len_a))
            yb = self.ef_blocks_B[i](x, rope, KVSlot(kb, vb, idx_b, len_b))
            x = torch.where(both, (ya + yb) * 0.5, torch.where(only_a, ya, yb))
        x = self.final_block(x, rope, KVSlot(*cache.full[1], pos, top + 1))
        cache.pos = pos + 1
        return self._logits(x)[:, 0]

    @staticmethod
    def _spans(attention_mask: Optional[torch.Tensor], b: int, n: int) -> Optional[tuple[list[int], list[int]]]:
        """(offset, length) of each row's run of ones in the mask; None when nothing is padded."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        mask = attention_mask.to(torch.bool)
        lengths = mask.sum(dim=1)
        offsets = torch.where(lengths > 0, mask.to(torch.int8).argmax(dim=1), torch.zeros_like(lengths))
        cols = torch.arange(n, device=mask.device)
        run = (cols >= offsets[:, None]) & (cols < (offsets + lengths)[:, None])
        if not torch.equal(run, mask):
            raise ValueError("attention_mask must be one run of ones per row (padding only on the left and/or right)")
        return offsets.tolist(), lengths.tolist()

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[SLAMCache] = None,
                past_key_values: Optional[SLAMCache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = None, logits_to_keep: int = 0, **kwargs):
        """input_ids [B, N] -> logits [B, N, V] (``CausalLMOutputWithPast``); ``labels`` (= input_ids,
        shifted inside, -100 ignored) adds the mean cross-entropy. ``position_ids`` are implied by the
        mask (each row starts at position 0) and ignored."""
        cfg = self.config
        if inputs_embeds is not None:
            raise ValueError("SLAM takes input_ids, not inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, SLAMCache):
            raise ValueError(f"SLAM's cache is a SLAMCache (from a previous forward), not {type(cache).__name__}")
        use_cache = (cfg.use_cache if use_cache is None else use_cache) and cfg.prefix_consistent
        b, n = input_ids.shape
        if cache is not None and cfg.prefix_consistent:  # decoding: one token per row per step
            columns = [self._decode_step(cache, input_ids[:, j]) for j in range(n)]
            cache.seen += n
            logits = torch.stack(columns, dim=1)  # [B, n, V]
        else:
            cache = None
            if n > cfg.max_seq_len:
                raise ValueError(f"sequence length {n} is longer than max_seq_len={cfg.max_seq_len}")
            spans = self._spans(attention_mask, b, n)
            hidden: Optional[list] = [] if use_cache else None
            if spans is None:
                x, plan = self._trunk(input_ids, hidden)
                lengths = [n] * b
                logits = self._logits(x if not logits_to_keep else x[:, -logits_to_keep:])
            elif cfg.prefix_consistent:  # shift every row to start at column 0, run the batch
                offsets, lengths = spans
                if min(lengths) < 1 and use_cache:
                    raise ValueError("a row of attention_mask has no ones: nothing to start generating from")
                cols = torch.arange(n, device=input_ids.device)
                src = (cols[None, :] + torch.tensor(offsets, device=input_ids.device)[:, None]).clamp(max=n - 1)
                width = max(1, max(lengths))
                shifted = torch.gather(input_ids, 1, src)[:, :width]
                x, plan = self._trunk(shifted, hidden)
                y = self._logits(x)  # [B, width, V]
                logits = y.new_zeros(b, n, y.shape[-1])
                for r, (o, L) in enumerate(zip(offsets, lengths)):
                    logits[r, o:o + L] = y[r, :L]
            else:  # fractional layout: the layout depends on the length, so each row alone
                offsets, lengths = spans
                logits = None
                for r, (o, L) in enumerate(zip(offsets, lengths)):
                    if L == 0:
                        continue
                    x, _ = self._trunk(input_ids[r:r + 1, o:o + L])
                    y = self._logits(x)[0]
                    if logits is None:
                        logits = y.new_zeros(b, n, y.shape[-1])
                    logits[r, o:o + L] = y
                if logits is None:
                    logits = self.lm_head.weight.new_zeros(b, n, cfg.vocab_size)
            if spans is not None and logits_to_keep:
                logits = logits[:, -logits_to_keep:]
            if use_cache:
                cache = self._prefill_cache(hidden, plan, lengths)
                cache.seen = n
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
