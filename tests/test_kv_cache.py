"""The causal-LM contract of revision 2 (shared/spec/slam_model.md): prefix consistency, and the
exact KV cache it allows (slam_pretrain/model/kv_cache.py) against the recompute path. fp32, CPU."""

from __future__ import annotations

import pytest
import torch

from slam_pretrain.errors import UserError
from slam_pretrain.downstream.generate import generate_batch, generate_ids
from slam_pretrain.model.kv_cache import decode_step, prefill
from slam_pretrain.model import PLAN_CACHE_SIZE, ModelConfig, SLAMv1LM

# S=12, O=3, T=9: overlaps [9, 12), [18, 21), ...
BASE = dict(vocab_size=64, max_seq_len=96, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, ef_cycles=2,
            segment_len=12, overlap=3)
VARIANTS = {
    "rope-pre-gqa": {},
    "learned-post-layernorm-gelu": dict(pos_encoding="learned", norm_position="post", norm="layernorm", ffn="gelu"),
    "rope-mha-post": dict(num_kv_heads=None, norm_position="post"),
    "learned-gqa1-pre": dict(pos_encoding="learned", num_kv_heads=1),
    "no-overlap": dict(segment_len=8, overlap=0),
    "one-token-segments": dict(segment_len=1, overlap=0, ef_cycles=1),
}


def build(**kw) -> SLAMv1LM:
    torch.manual_seed(0)
    return SLAMv1LM(ModelConfig(**{**BASE, **kw})).eval()


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_prefix_consistency(variant: str) -> None:
    """logits(x[:, :n]) == logits(x)[:, :n] for every n: n < T, T < n <= S, inside an overlap, on a
    stride boundary, ragged ends (all n in 1..N)."""
    model = build(**VARIANTS[variant])
    n_max = 50
    x = torch.randint(0, 64, (2, n_max), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        for n in range(1, n_max + 1):
            torch.testing.assert_close(model(x[:, :n]), full[:, :n], rtol=0, atol=1e-5,
                                       msg=lambda m: f"{variant}, n={n}: {m}")


def test_fractional_layout_is_not_prefix_consistent() -> None:
    """The documented exception: 0.6/0.2 moves with N, so a prefix computes another function."""
    model = build(segment_len=0.6, overlap=0.2, pos_encoding="learned")
    assert not model.config.prefix_consistent
    x = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x[:, :30]) - model(x)[:, :30]).abs().max() > 1e-4
    with pytest.raises(UserError, match="no exact KV cache"):
        prefill(model, [x[0].tolist()], 40)


def assert_cache_matches_full_forward(model: SLAMv1LM, n: int = 90) -> None:
    """Prefill of prompts of different lengths (a single token, T < n <= S, inside an overlap),
    then decoding past many segment boundaries: every step's logits equal the full forward's."""
    x = torch.randint(0, 64, (3, n), generator=torch.Generator().manual_seed(3))
    lengths = [1, 10, 20]
    with torch.no_grad():
        full = model(x)
        last, cache = prefill(model, [x[r, :lengths[r]].tolist() for r in range(3)], n)
        for r in range(3):
            torch.testing.assert_close(last[r], full[r, lengths[r] - 1], rtol=0, atol=1e-5)
        pos = list(lengths)
        for _ in range(n - max(lengths)):
            logits = decode_step(model, cache, torch.tensor([x[r, pos[r]] for r in range(3)]))
            for r in range(3):
                torch.testing.assert_close(logits[r], full[r, pos[r]], rtol=0, atol=1e-5,
                                           msg=lambda m: f"row {r} position {pos[r]}: {m}")
            pos = [p + 1 for p in pos]
    assert cache.pos.tolist() == pos


@pytest.mark.parametrize("variant", ["rope-pre-gqa", "learned-post-layernorm-gelu", "rope-mha-post", "no-overlap"])
def test_cache_logits_equal_full_forward(variant: str) -> None:
    """Prefill of prompts of different lengths, then decoding past many segment boundaries: every
    step's logits equal the full forward's at that position."""
    assert_cache_matches_full_forward(build(**VARIANTS[variant]))


def test_ef_cache_is_bounded_by_segment_length() -> None:
    """The EF blocks keep S positions each however long the context; the full blocks grow with it."""
    cfg = ModelConfig(**{**BASE, "max_seq_len": 512})
    model = SLAMv1LM(cfg).eval()
    per_pos = 2 * cfg.kv_heads * cfg.head_dim * 4  # k and v, fp32
    sizes = {}
    for capacity in (64, 512):
        _, cache = prefill(model, [[1] * 40], capacity)
        sizes[capacity] = (cache.nbytes("ef"), cache.nbytes("full"))
        assert cache.nbytes("ef") == cfg.ef_cycles * 2 * cfg.segment_len * per_pos
        assert cache.nbytes("full") == 2 * capacity * per_pos
        assert all(k.shape[2] == cfg.segment_len for cyc in cache.ef for kv in cyc for k in kv)
    assert sizes[64][0] == sizes[512][0]


@pytest.mark.parametrize("variant", ["rope-pre-gqa", "learned-post-layernorm-gelu"])
def test_generate_cache_equals_recompute(variant: str) -> None:
    """Greedy tokens with the cache equal the recompute path's, past max_seq_len (the window
    restarts from its last max_seq_len // 2 tokens in both), and sampling with a seed too."""
    model = build(**{**VARIANTS[variant], "max_seq_len": 40})
    prompt = torch.randint(0, 64, (15,), generator=torch.Generator().manual_seed(4)).tolist()
    lines: list[str] = []
    cached = generate_ids(model, prompt, 70, temperature=0.0, notify=lines.append)
    recomputed = generate_ids(model, prompt, 70, temperature=0.0, use_cache=False, notify=None)
    assert cached == recomputed and len(cached) == 70
    assert sum("reached model.max_seq_len=40" in line for line in lines) == 1
    sampled = generate_ids(model, prompt, 30, temperature=1.0, top_k=8, seed=5, notify=None)
    assert sampled == generate_ids(model, prompt, 30, temperature=1.0, top_k=8, seed=5, use_cache=False, notify=None)


def test_batch_generation_of_different_lengths_equals_each_alone() -> None:
    model = build()
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 11, 19, 30)]
    batch = generate_batch(model, prompts, 25, temperature=0.0, notify=None)
    assert batch == [generate_ids(model, p, 25, temperature=0.0, notify=None) for p in prompts]
    assert batch == generate_batch(model, prompts, 25, temperature=0.0, use_cache=False, notify=None)
    # A row that meets EOS stops; the others go on.
    eos = batch[1][4]
    stopped = generate_batch(model, prompts, 25, temperature=0.0, eos_id=eos, notify=None)
    for row, full in zip(stopped, batch):
        assert row == (full[:full.index(eos)] if eos in full else full)


def test_fractional_layout_generates_by_recomputing_and_says_why() -> None:
    model = build(segment_len=0.6, overlap=0.2, pos_encoding="learned")
    lines: list[str] = []
    out = generate_ids(model, [1, 2, 3], 5, temperature=0.0, notify=lines.append)
    assert out == generate_ids(model, [1, 2, 3], 5, temperature=0.0, use_cache=False, notify=None)
    assert len(lines) == 1 and "recomputing" in lines[0] and "fractions" in lines[0]


def test_plan_cache_is_bounded() -> None:
    """Scoring or generating at many lengths keeps at most PLAN_CACHE_SIZE EF plans."""
    model = build()
    with torch.no_grad():
        for n in range(1, 60):
            model(torch.zeros(1, n, dtype=torch.long))
    assert len(model._plans) == PLAN_CACHE_SIZE
    assert {n for n, _ in model._plans} == set(range(60 - PLAN_CACHE_SIZE, 60))
