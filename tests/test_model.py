"""SLAMv1LM against its contract (shared/spec/slam_model.md): causality, the batched EF cycle
against a plain per-segment loop, segment geometry, activation checkpointing, FLOP and parameter
counts, config validation and the shipped presets. Tiny dims, float32, CPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from slam_pretrain.config import load_config
from slam_pretrain.errors import ConfigError
from slam_pretrain.model import (ModelConfig, SLAMv1LM, count_params, ef_segments, flops_per_token,
                                 model_summary, rope_freqs)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def reference_cfg(**kw) -> ModelConfig:
    """The prototype preset, tiny: post-norm LayerNorm GELU learned positions, 0.6/0.2, 3 cycles."""
    base = dict(vocab_size=64, max_seq_len=64, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48,
                ef_cycles=3, segment_len=0.6, overlap=0.2, norm="layernorm", norm_position="post",
                ffn="gelu", pos_encoding="learned", tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def modern_cfg(**kw) -> ModelConfig:
    """The modern default, tiny: pre-norm RMSNorm SwiGLU RoPE, fixed segments S=12, O=3 (T=9)."""
    base = dict(vocab_size=64, max_seq_len=64, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48,
                ef_cycles=2, segment_len=12, overlap=3, norm="rmsnorm", norm_position="pre",
                ffn="swiglu", pos_encoding="rope", tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> SLAMv1LM:
    torch.manual_seed(seed)
    return SLAMv1LM(cfg)


# N < T, T < N <= S, N inside an overlap, N = O + K*T, N a multiple of the stride T=9, ragged N.
MODERN_NS = [8, 10, 19, 21, 27, 31]
REFERENCE_NS = [5, 10, 23, 40]
CASES = [("modern", n) for n in MODERN_NS] + [("reference", n) for n in REFERENCE_NS]
PRESETS = {"modern": modern_cfg, "reference": reference_cfg}


@pytest.mark.parametrize("preset,n", CASES)
def test_causality(preset: str, n: int) -> None:
    model = build(PRESETS[preset]()).eval()
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, 64, (2, n), generator=g)
    with torch.no_grad():
        base = model(tokens)
        for t in range(n - 1):
            changed = tokens.clone()
            # A different token at every position after t.
            changed[:, t + 1:] = (changed[:, t + 1:] + torch.randint(1, 64, (2, n - t - 1), generator=g)) % 64
            out = model(changed)
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5,
                                       msg=lambda m: f"N={n}: logits at <= {t} changed: {m}")
            assert not torch.allclose(out[:, t + 1], base[:, t + 1]), "the perturbation had no effect"


def loop_forward(model: SLAMv1LM, tokens: torch.Tensor) -> torch.Tensor:
    """The contract written as a plain loop over segments: each segment through its block on its
    own (global RoPE positions), outputs averaged where segments overlap."""
    cfg = model.config
    b, n = tokens.shape
    x = model.tok_emb(tokens)
    full_rope = None
    if model.pos_emb is not None:
        x = x + model.pos_emb.weight[:n]
    else:
        full_rope = rope_freqs(torch.arange(n), cfg)[None, None]
    x = model.initial_block(x, full_rope)
    segs = cfg.ef_segments(n)
    for i in range(cfg.ef_cycles):
        out, count = torch.zeros_like(x), torch.zeros(n, 1)
        for k, (s, e) in enumerate(segs):
            block = model.ef_blocks_A[i] if k % 2 == 0 else model.ef_blocks_B[i]
            rope = None
            if full_rope is not None:
                rope = rope_freqs(torch.arange(s, e), cfg)[None, None]
            out[:, s:e] += block(x[:, s:e], rope)
            count[s:e] += 1
        x = out / count
    x = model.final_block(x, full_rope)
    return model.lm_head(model.norm_f(x))


@pytest.mark.parametrize("preset,n", CASES)
def test_batched_ef_matches_segment_loop(preset: str, n: int) -> None:
    model = build(PRESETS[preset]())
    tokens = torch.randint(0, 64, (3, n), generator=torch.Generator().manual_seed(n))
    targets = torch.roll(tokens, -1, 1)

    logits, loss = model(tokens, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, materialize_grads=True)
    ref_logits = loop_forward(model, tokens)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, 64), targets.reshape(-1))
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True,
                                    materialize_grads=True)

    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    names = [name for name, _ in model.named_parameters()]
    for name, g, rg in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    if len(model.config.ef_segments(n)) > 1:  # block B really was used
        assert grads[names.index("ef_blocks_B.0.ffn.down.weight")].abs().sum() > 0


@pytest.mark.parametrize("s,o", [(1, 0), (5, 0), (5, 2), (12, 3), (48, 8), (64, 31)])
def test_ef_segments_geometry(s: int, o: int) -> None:
    for n in range(1, 200):
        segs = ef_segments(n, s, o)
        count = torch.zeros(n, dtype=torch.long)
        for k, (a, e) in enumerate(segs):
            assert a == k * (s - o) and 0 <= a < e <= n and e - a <= s
            count[a:e] += 1
        assert count.min() >= 1, f"n={n}: [0, n) not covered by {segs}"
        assert count.max() <= 2, f"n={n}: a position in more than two segments: {segs}"
        assert len(segs) == -(-n // (s - o))  # revision 2: every segment starting before n exists
        # Prefix consistency of the layout: the segments holding p do not depend on n.
        for p in range(n):
            assert [k for k, (a, e) in enumerate(segs) if a <= p < e] == \
                [k for k in range(p // (s - o) + 1) if k * (s - o) <= p < k * (s - o) + s]
        old = ef_segments(n, s, o, drop_overlap_tail=True)  # revision 1's count, for fractional layouts
        assert len(old) == (1 if n <= s else -(-(n - o) // (s - o))) and old == segs[:len(old)]
    with pytest.raises(ValueError):
        ef_segments(10, 4, 2)  # overlap must be < S/2


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_reference_preset_two_segments(n: int) -> None:
    cfg = reference_cfg()
    assert cfg.ef_segments(n) == [(0, 6 * n // 10), (4 * n // 10, n)]


def test_fractional_layout_keeps_two_segments() -> None:
    cfg = reference_cfg()
    for n in range(2, 600):
        s, o = cfg.segment_layout(n)
        assert 0 <= o < s / 2 and s <= n
        assert len(cfg.ef_segments(n)) == 2, f"n={n}: S={s} O={o}"
    assert cfg.segment_layout(1) == (1, 0)
    assert not cfg.prefix_consistent
    # Tokens: the layout never depends on N (N <= T is one segment, T < N <= S already two).
    assert modern_cfg().segment_layout(8) == (12, 3)
    assert modern_cfg().ef_segments(8) == [(0, 8)] and modern_cfg().ef_segments(10) == [(0, 10), (9, 10)]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_identical(dropout: float) -> None:
    cfg = modern_cfg(dropout=dropout)
    tokens = torch.randint(0, 64, (2, 31), generator=torch.Generator().manual_seed(0))
    targets = torch.roll(tokens, -1, 1)

    def run(model: SLAMv1LM) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel()
            return t

        torch.manual_seed(123)  # same dropout masks in both runs
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(tokens, targets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], saved[0]

    plain = build(cfg).train()
    ckpt = build(cfg).train()
    calls = []

    def wrap(fn, x):
        calls.append(fn)
        return checkpoint(fn, x, use_reentrant=False)

    ckpt.cycle_wrapper = ckpt.block_wrapper = wrap
    loss_a, grads_a, saved_a = run(plain)
    loss_b, grads_b, saved_b = run(ckpt)
    assert len(calls) == cfg.ef_cycles + 2  # one region per EF cycle, plus initial and final block
    assert saved_b < saved_a / 2, "checkpointing saved as many activations as the plain run"
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for g_b, g_a in zip(grads_b, grads_a):
        torch.testing.assert_close(g_b, g_a, rtol=0, atol=1e-7)


@pytest.mark.parametrize("cfg,n", [
    (ModelConfig(vocab_size=2048, max_seq_len=128, d_model=128, num_heads=4, num_kv_heads=2, d_ff=352,
                 ef_cycles=2, segment_len=48, overlap=8), 128),
    (reference_cfg(vocab_size=2048, max_seq_len=128, d_model=128, d_ff=256, ef_cycles=2), 128),
    # Attention-dominated (N >> d_model, a ragged last segment): pins the attention term.
    (modern_cfg(max_seq_len=256, segment_len=64, overlap=16), 250),
    # Many segments with wide overlaps: pins counting the overlap tokens twice.
    (modern_cfg(max_seq_len=128, segment_len=12, overlap=5), 128),
], ids=["tiny", "reference", "attention-heavy", "wide-overlap"])
def test_flops_per_token_matches_flop_counter(cfg: ModelConfig, n: int) -> None:
    model = build(cfg)
    b = 2
    tokens = torch.randint(0, cfg.vocab_size, (b, n))
    # The CPU flash kernel has no FLOP formula in FlopCounterMode: the math backend spells
    # attention out as matmuls that it counts.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(tokens, tokens)
        loss.backward()
    measured = counter.get_total_flops() / (b * n)
    predicted = flops_per_token(cfg, n)
    assert abs(predicted - measured) / measured < 0.10, f"predicted {predicted:.4g}, measured {measured:.4g}"


@pytest.mark.parametrize("cfg", [
    modern_cfg(),
    modern_cfg(tie_embeddings=False, num_kv_heads=None),
    modern_cfg(num_kv_heads=1, ffn="gelu", norm="layernorm"),
    reference_cfg(),
    reference_cfg(tie_embeddings=True, ef_cycles=1, norm="rmsnorm", ffn="swiglu"),
])
def test_count_params_analytic_equals_built(cfg: ModelConfig) -> None:
    model = build(cfg)
    unique = {id(p): p for m in model.modules() for p in m.parameters(recurse=False)}
    assert count_params(cfg) == sum(p.numel() for p in unique.values()) == count_params(model)
    assert count_params(cfg, non_embedding=True) == count_params(model, non_embedding=True)
    assert (model.lm_head.weight is model.tok_emb.weight) == cfg.tie_embeddings
    assert (model.pos_emb is not None) == (cfg.pos_encoding == "learned")


@pytest.mark.parametrize("override,key,value,hint", [
    ("model.d_model=30", "model.d_model", "30", "divisible by num_heads"),
    ("model.overlap=128", "model.overlap", "128", "overlap < segment_len/2"),
    ("model.d_ff=-4", "model.d_ff", "-4", "positive"),
    ("model.d_modle=64", "model.d_modle", "", "did you mean 'model.d_model'"),
    ("model.num_heads=abc", "model.num_heads", "abc", "expected int"),
    ("model.segment_len=1.5", "model.segment_len", "1.5", "(0, 1]"),
])
def test_invalid_config_rejected(override: str, key: str, value: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert key in msg and value in msg and hint in msg, msg
    assert "\n" not in msg


def test_forward_rejects_too_long_sequence() -> None:
    from slam_pretrain.errors import UserError

    model = build(modern_cfg(max_seq_len=16))
    with pytest.raises(UserError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    summary = model_summary(cfg.model, cfg.data.seq_len)
    assert "EF segments" in summary
    assert flops_per_token(cfg.model, cfg.data.seq_len) > 6 * count_params(cfg.model, non_embedding=True) * 0.5
    sizes = {"slam_125m.yaml": 125e6, "slam_1b.yaml": 1.0e9}
    if path.name in sizes:  # the name tells the size
        assert abs(count_params(cfg.model) / sizes[path.name] - 1) < 0.15, summary


def test_reference_config_is_the_prototype() -> None:
    m = load_config(CONFIGS / "slam_v1_reference.yaml").model
    assert (m.norm_position, m.norm, m.ffn, m.pos_encoding) == ("post", "layernorm", "gelu", "learned")
    assert (m.segment_len, m.overlap, m.ef_cycles) == (0.6, 0.2, 3)
    assert isinstance(m.segment_len, float) and isinstance(m.overlap, float)


def test_shipped_config_names() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"slam_v1_reference.yaml", "slam_125m.yaml", "slam_1b.yaml", "long_context_32k.yaml",
            "long_context_128k.yaml"} <= names


def test_rope_scaling_interpolates_positions() -> None:
    cfg = modern_cfg(rope_scaling=4.0)
    scaled = rope_freqs(torch.arange(0, 40, 4), cfg)
    plain = rope_freqs(torch.arange(10), dataclasses.replace(cfg, rope_scaling=1.0))
    torch.testing.assert_close(scaled, plain)


def test_meta_device_build_then_init_weights() -> None:
    """Engines may build on the meta device, to_empty() and init_weights(): the tie must survive."""
    cfg = modern_cfg()
    with torch.device("meta"):
        model = SLAMv1LM(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_emb.weight
    assert count_params(model) == count_params(cfg)
    assert torch.isfinite(model(torch.randint(0, 64, (2, 30)))).all()
