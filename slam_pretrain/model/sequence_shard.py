"""Context parallelism, the model's side: each rank of a group of K computes a part of every sequence.

The engine (``slam_pretrain/engine/context_parallel.py``) sets ``model.sequence_shard`` to a
``SequenceShard``: the group's size K, this rank's place in it, and ``gather``, a differentiable
all-gather. Everything here is geometry and tensor algebra; the model holds no distributed code.

Layout (causal load balancing, as the Llama 3 recipe): the N tokens of a row are cut into 2K
chunks of C = N / 2K tokens, and rank r computes chunks r and 2K-1-r, so every rank does the same
causal attention work (an early chunk attends to few keys, a late one to many).

- **Full blocks** (initial, final): each rank projects q, k, v for its own 2C tokens, all-gathers
  k and v (one collective, stacked), and attends its queries of chunk [a, b) to the keys [0, b),
  causally (lower-right aligned: a causal bias on CUDA, ``OffsetCausalAttention`` on the CPU, no
  mask tensor either way). Keys and values of N tokens live on every rank (small with GQA);
  queries, scores and outputs are N/K.
- **EF cycles**: C is a multiple of the stride T = S - O, so a chunk owns the segments starting
  inside it, and only its last one runs O tokens into the next chunk. A chunk needs those O
  inputs of its successor (a halo) and hands back its partial fusion sums at those O positions:
  two all-gathers of [2, B, O, D] per cycle, whatever N is. A dense model's CP moves the keys and
  values of the whole sequence in every layer; SLAM's EF cycles move 4 x O tokens' activations.

Every value is the function the unsharded model computes (fp32: equal to ~1e-6); what differs is
only the order of floating-point sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from slam_pretrain.errors import UserError
from slam_pretrain.model.slam_v1 import (AttnMask, DocMasks, EFPlan, doc_mask_flex, doc_masks_from_ids,
                                         document_block_mask, document_ids, flex_attend, rope_freqs,
                                         same_document_causal)

if TYPE_CHECKING:
    from slam_pretrain.model.slam_v1 import ModelConfig, SLAMv1LM


def layout_problem(cfg: "ModelConfig", n: int, k: int) -> Optional[str]:
    """Why sequences of length n cannot be split over k context-parallel ranks (None: they can)."""
    if cfg.fractional_segments:
        return ("context parallelism needs model.segment_len and model.overlap in tokens (a fractional layout "
                "moves with N, so its segments cannot be given to ranks ahead of time)")
    s, o = cfg.segment_layout(n)
    t = s - o
    if n % (2 * k) or (n // (2 * k)) % t:
        return (f"sequence length {n} does not split over context_parallel={k}: it is cut into 2 x {k} chunks, each "
                f"a multiple of the EF stride segment_len - overlap = {t}, so it must be a multiple of {2 * k * t}")
    return None


@dataclass
class SequenceShard:
    """One rank's share of every sequence under context parallelism (see the module docstring)."""

    size: int  # K: ranks in the context-parallel group
    rank: int  # this rank's index in the group
    # x -> [K, *x.shape]: every group rank's x in rank order; differentiable (backward sums the
    # gradients of each rank's piece back to it). Same shape on every rank.
    gather: Callable[[torch.Tensor], torch.Tensor]
    _positions: dict = field(default_factory=dict, repr=False)

    def chunk_ids(self, rank: Optional[int] = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return r, 2 * self.size - 1 - r

    def holder(self, g: int) -> tuple[int, int]:
        """(rank, local index) of global chunk g."""
        return (g, 0) if g < self.size else (2 * self.size - 1 - g, 1)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """This rank's chunks [a, b) of a length-n sequence, in local order."""
        c = n // (2 * self.size)
        return [(g * c, (g + 1) * c) for g in self.chunk_ids()]

    def positions(self, n: int, device: torch.device) -> torch.Tensor:
        """[2C] long: the global positions of this rank's tokens, in local order."""
        key = (n, str(device))
        if key not in self._positions:
            self._positions.clear()
            self._positions[key] = torch.cat([torch.arange(a, b, device=device) for a, b in self.chunks(n)])
        return self._positions[key]

    def to_global(self, gathered: torch.Tensor, dim: int) -> torch.Tensor:
        """``gather``'s output [K, ...] (each rank's 2C tokens along ``dim`` of its piece) -> the
        whole sequence in order along ``dim`` (of the piece's shape)."""
        c = gathered.shape[dim + 1] // 2
        pieces = []
        for g in range(2 * self.size):
            r, j = self.holder(g)
            pieces.append(gathered[r].narrow(dim, j * c, c))
        return torch.cat(pieces, dim=dim)

    def local_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """targets [B, N] -> (this rank's targets [B, 2C], the loss denominator): the loss of a rank
        is its summed CE / denominator with denominator = (targets counted over the whole rows) / K.
        Engines average gradients over every rank, context ranks included, so the K ranks of a row
        together give the gradient of the row's mean loss; the mean of their losses is the row's."""
        count = (targets != -100).sum().clamp(min=1)
        return targets[:, self.positions(targets.shape[1], targets.device)], count / self.size


class GatheredAttention:
    """The full blocks' attention under context parallelism: local queries, gathered keys/values."""

    def __init__(self, shard: SequenceShard, n: int, masks: Optional[list[AttnMask]]):
        self.shard = shard
        self.chunks = shard.chunks(n)
        # Per local chunk (document masking): [B, 1, C, b] bool, or the BlockMask of queries [a, b)
        # against keys [0, b) at large N (slam_v1.doc_mask_flex); None: plain causal.
        self.masks = masks

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, gqa: bool) -> torch.Tensor:
        """q [B, H, 2C, hd], k/v [B, Hkv, 2C, hd] -> [B, H, 2C, hd]."""
        kv = self.shard.to_global(self.shard.gather(torch.stack([k, v])), dim=3)  # [2, B, Hkv, N, hd]
        k_all, v_all = kv.unbind(0)
        c = q.shape[2] // 2
        out = []
        for i, (a, b) in enumerate(self.chunks):
            qi = q[:, :, i * c:(i + 1) * c]  # [B, H, C, hd]
            ki, vi = k_all[:, :, :b], v_all[:, :, :b]  # keys [0, b): query a + j sees keys <= a + j
            if self.masks is not None and isinstance(self.masks[i], BlockMask):
                out.append(flex_attend(qi, ki, vi, self.masks[i], dropout, gqa))  # [B, H, C, hd]
                continue
            if self.masks is not None:
                mask = self.masks[i]
            elif q.device.type == "cuda":  # lower-right causal without a mask: flash / efficient kernels
                from torch.nn.attention.bias import causal_lower_right

                mask = causal_lower_right(c, b)
                if gqa:  # those kernels take equal head counts
                    rep = q.shape[1] // ki.shape[1]
                    ki, vi, gqa = ki.repeat_interleave(rep, dim=1), vi.repeat_interleave(rep, dim=1), False
            elif dropout == 0.0:  # the CPU: no mask tensor either (see OffsetCausalAttention)
                out.append(OffsetCausalAttention.apply(qi, ki, vi, a))
                continue
            else:  # dropout on the CPU: the boolean mask (SDPA saves it for backward, as fp32)
                mask = torch.ones(c, b, dtype=torch.bool, device=q.device).tril(diagonal=a)  # [C, b]
            out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa))
        return torch.cat(out, dim=2)


class OffsetCausalAttention(torch.autograd.Function):
    """CPU attention of queries at positions [a, a + C) to keys [0, a + C), causal, without a mask.

    A boolean [C, a + C] mask would be saved for backward (as fp32 by SDPA's CPU kernel: 4 bytes a
    score, more than the activations it serves at 16K). Instead the keys are cut in two: the prefix
    [0, a), which every query sees, and the square [a, a + C), causal. Each part runs the fused CPU
    flash kernel, which returns its log-sum-exp, and the parts merge as softmax blocks do:
    lse = logaddexp(lse_1, lse_2), out = out_1 exp(lse_1 - lse) + out_2 exp(lse_2 - lse). Backward
    runs the kernel's backward per part with the merged out and lse, which gives each part's exact
    share (the probabilities are exp(scores - lse) with the whole row's lse). Saved: q, k, v, out,
    lse; nothing of size C x (a + C). Keys/values may have fewer heads (GQA): expanded inside, never
    saved expanded, gradients summed back per group.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: int) -> torch.Tensor:
        # q [B, H, C, hd], k/v [B, Hkv, a + C, hd] -> [B, H, C, hd]
        ke, ve = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(q, ke[:, :, a:], ve[:, :, a:], 0.0, True)  # the square: plain causal
        if a > 0:
            out_p, lse_p = flash(q, ke[:, :, :a], ve[:, :, :a], 0.0, False)  # the prefix: every key
            merged = torch.logaddexp(lse, lse_p)  # [B, H, C] fp32
            out = (out.float() * (lse - merged).exp()[..., None]
                   + out_p.float() * (lse_p - merged).exp()[..., None]).to(q.dtype)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.a = a
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        a, h = ctx.a, q.shape[1]
        ke, ve = _expand_heads(k, h), _expand_heads(v, h)
        back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad = grad.contiguous()
        dq, dk_sq, dv_sq = back(grad, q, ke[:, :, a:], ve[:, :, a:], out, lse, 0.0, True)
        if a > 0:
            dq_p, dk_p, dv_p = back(grad, q, ke[:, :, :a], ve[:, :, :a], out, lse, 0.0, False)
            dq = dq + dq_p
            dk_sq, dv_sq = torch.cat([dk_p, dk_sq], dim=2), torch.cat([dv_p, dv_sq], dim=2)
        return dq, _sum_heads(dk_sq, k.shape[1]), _sum_heads(dv_sq, v.shape[1]), None


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, L, hd] -> [B, H, L, hd]: query head j reads key/value head j // (H / Hkv), as SDPA's GQA."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _sum_heads(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of _expand_heads: [B, H, L, hd] -> [B, Hkv, L, hd]."""
    b, h, n, d = g.shape
    return g if h == kv_heads else g.view(b, kv_heads, h // kv_heads, n, d).sum(2)


def build_chunk_plan(cfg: "ModelConfig", n: int, a: int, b: int, device: torch.device) -> EFPlan:
    """The EF plan of chunk [a, b) of a length-n sequence: the segments starting in [a, b) (a is a
    multiple of T), over the local positions [a, min(n, b + O)), with the global fusion weights and
    RoPE factors of their global positions."""
    s, o = cfg.segment_layout(n)
    t = s - o
    e = min(n, b + o)
    length, k = e - a, (b - a) // t
    count = torch.zeros(length, 1)
    for st, en in cfg.ef_segments(n):  # segments of the whole sequence that reach into [a, e)
        lo, hi = max(st, a), min(en, e)
        if lo < hi:
            count[lo - a:hi - a] += 1
    pad = min(s, length)
    rope_full = rope_even = rope_odd = None
    if cfg.pos_encoding == "rope":
        rope_full = rope_freqs(torch.arange(a, e, device=device), cfg)[None, None]
        slots = torch.arange(pad, device=device)
        starts = a + torch.arange(0, k, device=device) * t
        rope_even = rope_freqs(starts[0::2, None] + slots, cfg)[:, None]
        rope_odd = rope_freqs(starts[1::2, None] + slots, cfg)[:, None]
    return EFPlan(length, s, t, pad, (k + 1) // 2, k // 2, (1.0 / count).to(device), rope_full, rope_even, rope_odd,
                  odd_first=(a // t) % 2 == 1, partial=True)


@dataclass
class ShardedForward:
    """What one sharded forward pass needs, built once from the tokens (plans are cached)."""

    shard: SequenceShard
    c: int  # chunk length C
    o: int  # EF overlap O
    plans: list[EFPlan]  # per local chunk
    docs: list[Optional[DocMasks]]  # per local chunk (document masking), else None
    attention: GatheredAttention


def prepare(model: "SLAMv1LM", tokens: torch.Tensor) -> tuple[ShardedForward, torch.Tensor, Optional[torch.Tensor]]:
    """(the pass's ShardedForward, this rank's positions [2C], per-row positions [B, 2C] when
    document positions restart, else None) for tokens [B, N] (every rank holds the whole rows)."""
    cfg, shard = model.config, model.sequence_shard
    n = tokens.shape[1]
    problem = layout_problem(cfg, n, shard.size)
    if problem is not None:
        raise UserError(problem)
    chunks = shard.chunks(n)
    idx = shard.positions(n, tokens.device)
    plans = [model.chunk_plan(n, a, b, tokens.device) for a, b in chunks]
    o = cfg.segment_layout(n)[1]
    docs: list[Optional[DocMasks]] = [None] * len(chunks)
    masks, row_pos = None, None
    if cfg.doc_masking:
        doc, pos = document_ids(tokens, cfg.eos_id)  # [B, N] each: whole rows, no communication
        flex = doc_mask_flex(n, tokens.device, cfg.dropout if model.training else 0.0)  # the unsharded rule, at N
        masks = []
        for i, ((a, b), plan) in enumerate(zip(chunks, plans)):
            masks.append(document_block_mask(doc, a, b) if flex else same_document_causal(doc, a, b))  # [B, 1, C, b]
            e = a + plan.n
            # The chunk's EF segments: bool masks (no full-chunk mask: GatheredAttention is the full one).
            docs[i] = doc_masks_from_ids(cfg, plan, doc[:, a:e], pos[:, a:e], full=None)
        if cfg.doc_position_reset:
            row_pos = pos[:, idx]
    fwd = ShardedForward(shard, n // (2 * shard.size), o, plans, docs, GatheredAttention(shard, n, masks))
    return fwd, idx, row_pos


def ef_cycle(model: "SLAMv1LM", i: int, x: torch.Tensor, fwd: ShardedForward) -> torch.Tensor:
    """EF cycle i on this rank's chunks x [B, 2C, D] -> [B, 2C, D], with the halo exchange."""
    shard, c, o = fwd.shard, fwd.c, fwd.o
    last = 2 * shard.size - 1
    xs = x.split(c, dim=1)  # the two chunks, [B, C, D] each
    ids = shard.chunk_ids()
    heads = shard.gather(torch.stack([xc[:, :o] for xc in xs])) if o else None  # [K, 2, B, O, D]
    outs, tails = [], []
    for j, (g, xc) in enumerate(zip(ids, xs)):
        if o and g < last:  # the segments starting here run O tokens into chunk g + 1
            xc = torch.cat([xc, heads[shard.holder(g + 1)]], dim=1)  # [B, C + O, D]
        y = model._ef_cycle(i, fwd.plans[j], xc, fwd.docs[j])  # weighted partial sums
        outs.append(y[:, :c])
        if o:
            tails.append(y[:, c:] if g < last else y.new_zeros(y.shape[0], o, y.shape[2]))
    if o:
        tails_all = shard.gather(torch.stack(tails))  # [K, 2, B, O, D]
        for j, g in enumerate(ids):
            if g > 0:  # add what chunk g - 1's last segment computed at this chunk's first O positions
                outs[j] = torch.cat([outs[j][:, :o] + tails_all[shard.holder(g - 1)], outs[j][:, o:]], dim=1)
    return torch.cat(outs, dim=1)


def rope_for(cfg: "ModelConfig", idx: torch.Tensor, row_pos: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """RoPE factors of this rank's tokens for the full blocks: [1, 1, 2C, hd/2] (or [B, 1, 2C, hd/2]
    when positions restart per document); None for learned positions."""
    if cfg.pos_encoding != "rope":
        return None
    return rope_freqs(idx, cfg)[None, None] if row_pos is None else rope_freqs(row_pos, cfg)[:, None]
