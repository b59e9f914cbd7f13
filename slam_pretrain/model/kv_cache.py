"""Exact incremental decoding for SLAMv1LM: a KV cache bounded by S in every EF block.

Why it exists (shared/spec/slam_model.md, revision 2): with S and O in tokens, the segments that
hold position p are {k : kT <= p < kT + S} whatever the sequence length, so the output at p is
one function of tokens 0..p. Decoding one token at a time can therefore reuse what earlier steps
computed:

- the initial and final blocks attend over the whole context: they cache every position
  (buffers [B, Hkv, capacity, hd]);
- an EF block attends only inside a segment. At position p, block A's open segment (if any) is
  the even k with kT <= p < kT + S, block B's the odd one; since S < 2T a block never has two
  open segments, so each keeps one buffer [B, Hkv, S, hd] whose slot j holds position start + j.
  A segment opens at its first position (slot 0 is written before it is read), so a closed
  segment's entries never need clearing: the attention mask only reads slots <= p - start.

The cycle's output at p is block A's, block B's, or (in an overlap) their mean, as in training.
Rows of a batch decode at their own positions (prompts of different lengths): every index is per
row. Fractional layouts (``segment_len: 0.6``) move with N, so they have no such cache; callers
check ``ModelConfig.prefix_consistent`` (generate.py recomputes for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slam_pretrain.errors import UserError
from slam_pretrain.model import KVSlot, SLAMv1LM, rope_freqs


@dataclass
class SLAMCache:
    """Keys/values of every attention layer and the next position of each row."""

    full: list[tuple[torch.Tensor, torch.Tensor]]  # initial, final block: [B, Hkv, capacity, hd] each
    ef: list[list[tuple[torch.Tensor, torch.Tensor]]]  # [cycle][A, B]: [B, Hkv, S, hd] each
    pos: torch.Tensor  # [B] long: position of the next token of each row
    capacity: int

    def nbytes(self, part: str = "all") -> int:
        """Bytes held: ``full``, ``ef`` or ``all``."""
        full = sum(t.numel() * t.element_size() for kv in self.full for t in kv)
        ef = sum(t.numel() * t.element_size() for cyc in self.ef for kv in cyc for t in kv)
        return {"full": full, "ef": ef, "all": full + ef}[part]


def open_segment(pos: torch.Tensor, parity: int, seg: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For positions pos [B]: (is a segment of this parity open at pos, its start), both [B].

    The segments holding p are k_hi = p // T and, when p - (k_hi - 1) T < S, k_hi - 1; at most one
    of them has the given parity (0: block A, 1: block B)."""
    k_hi = pos // stride
    k = torch.where(k_hi % 2 == parity, k_hi, k_hi - 1)
    start = k * stride
    return (k >= 0) & (pos - start < seg), start


def _buffers(model: SLAMv1LM, b: int, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    shape = (b, cfg.kv_heads, length, cfg.head_dim)
    return torch.zeros(shape, dtype=like.dtype, device=like.device), torch.zeros(shape, dtype=like.dtype, device=like.device)


@torch.no_grad()
def prefill(model: SLAMv1LM, prompts: list[list[int]], capacity: int) -> tuple[torch.Tensor, SLAMCache]:
    """One forward pass over the prompts (right-padded: causal, so padding changes nothing before
    it) -> (logits of each prompt's last token [B, V], the cache for decoding from there).

    ``capacity``: positions the full blocks' cache holds (prompt + new tokens, at most
    ``model.max_seq_len``)."""
    cfg = model.config
    if not cfg.prefix_consistent:
        raise UserError(f"model.segment_len={cfg.segment_len!r} is a fraction of the sequence length: the EF "
                        f"layout moves with N, so there is no exact KV cache (recompute instead)")
    if cfg.doc_masking:
        # The cache does not track documents (an EOS fed while decoding would have to hide every
        # cached position before it); the full forward (recompute) applies document masking exactly.
        raise UserError("model.doc_masking=true: the KV cache does not apply document masking; "
                        "generate with --no-cache (recompute), which does")
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1 or max(lengths) > capacity or capacity > cfg.max_seq_len:
        raise ValueError(f"prompt lengths {min(lengths)}..{max(lengths)} and capacity {capacity} must satisfy "
                         f"1 <= length <= capacity <= model.max_seq_len={cfg.max_seq_len}")
    device = next(model.parameters()).device
    n = max(lengths)
    tokens = torch.tensor([p + [0] * (n - len(p)) for p in prompts], dtype=torch.long, device=device)
    hidden: list[torch.Tensor] = []
    logits = model(tokens, hidden=hidden)  # [B, n, V]; hidden: inputs of initial, cycles, final
    b = len(prompts)
    last = logits[torch.arange(b, device=device), torch.tensor(lengths, device=device) - 1]  # [B, V]
    plan = model.ef_plan(n, device)
    like = hidden[0]

    full = []
    for block, h in ((model.initial_block, hidden[0]), (model.final_block, hidden[-1])):
        k_buf, v_buf = _buffers(model, b, capacity, like)
        k, v = block.keys_values(h, plan.rope_full)  # [B, Hkv, n, hd]
        k_buf[:, :, :n], v_buf[:, :, :n] = k, v
        full.append((k_buf, v_buf))

    seg, overlap = cfg.segment_layout(n)
    stride = seg - overlap
    nxt = torch.tensor(lengths, device=device)  # the position each row decodes next
    ef = []
    for i in range(cfg.ef_cycles):
        h = hidden[1 + i]
        cycle = []
        for parity, block in ((0, model.ef_blocks_A[i]), (1, model.ef_blocks_B[i])):
            k_buf, v_buf = _buffers(model, b, seg, like)
            is_open, start = open_segment(nxt, parity, seg, stride)
            for r in range(b):  # the open segment's positions [start, next) of each row
                s0, s1 = int(start[r]), lengths[r]
                if bool(is_open[r]) and s1 > s0:
                    rope = None if plan.rope_full is None else plan.rope_full[:, :, s0:s1]
                    k, v = block.keys_values(h[r:r + 1, s0:s1], rope)
                    k_buf[r, :, :s1 - s0], v_buf[r, :, :s1 - s0] = k[0], v[0]
            cycle.append((k_buf, v_buf))
        ef.append(cycle)
    return last, SLAMCache(full, ef, nxt, capacity)


@torch.no_grad()
def decode_step(model: SLAMv1LM, cache: SLAMCache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (tokens [B]) at the cache's positions; -> logits [B, V]. Advances
    ``cache.pos``. Every block runs on one token; EF attention reads at most S cached slots."""
    cfg = model.config
    pos = cache.pos
    top = int(pos.max())
    if top >= cache.capacity:
        raise ValueError(f"the cache holds {cache.capacity} positions; position {top} does not fit")
    seg, overlap = cfg.segment_layout(cfg.max_seq_len)
    stride = seg - overlap
    x = model.tok_emb(tokens)[:, None]  # [B, 1, D]
    rope = None
    if model.pos_emb is not None:
        x = x + model.pos_emb(pos)[:, None]
    else:
        rope = rope_freqs(pos, cfg)[:, None, None]  # [B, 1, 1, hd/2]: each row at its own position
    x = model.drop(x)

    def full_slot(j: int) -> KVSlot:
        k, v = cache.full[j]
        return KVSlot(k, v, pos, top + 1)

    x = model.initial_block(x, rope, full_slot(0))
    open_a, start_a = open_segment(pos, 0, seg, stride)
    open_b, start_b = open_segment(pos, 1, seg, stride)
    # Slot of the new token in each block's buffer; rows with no open segment of that parity
    # write a slot that is rewritten before it is ever read (see the module docstring).
    idx_a, idx_b = (pos - start_a).clamp(0, seg - 1), (pos - start_b).clamp(0, seg - 1)
    len_a, len_b = int(idx_a.max()) + 1, int(idx_b.max()) + 1
    both, only_a = (open_a & open_b)[:, None, None], (open_a & ~open_b)[:, None, None]
    for i in range(cfg.ef_cycles):
        (ka, va), (kb, vb) = cache.ef[i]
        ya = model.ef_blocks_A[i](x, rope, KVSlot(ka, va, idx_a, len_a))
        yb = model.ef_blocks_B[i](x, rope, KVSlot(kb, vb, idx_b, len_b))
        x = torch.where(both, (ya + yb) * 0.5, torch.where(only_a, ya, yb))  # the fusion mean
    x = model.final_block(x, rope, full_slot(1))
    cache.pos = pos + 1
    return model.lm_head(model.norm_f(x))[:, 0]  # [B, V]
