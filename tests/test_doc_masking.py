"""Document masking (model.doc_masking, issue 13 part 1): every attention sees only its own document.

What equality means here. The EF segment layout is global (segment k = [kT, kT + S) of the row),
so a document's EF segments depend on where it sits in the row: masking makes a document's logits
a function of its own tokens and its offset, never of the other documents. The tests check:
- full attention only (one segment spans the row): each document of a packed row equals the
  document run alone from position 0 (with position reset; with RoPE also without, RoPE being
  relative), and for learned positions without reset, the document run alone at its offset;
- EF cycles over many segments (documents across segment boundaries, one inside an overlap): each
  document equals the document run "alone at its offset", behind a filler document ending in EOS
  (two different fillers), with and without reset;
- with no overlap and a document starting at a multiple of 2S (its segments aligned, same A/B
  parity) and position reset, it equals the document run alone from position 0, exactly as a
  document in generation; without reset learned positions make it differ;
- masking off: documents still see each other, and masking on a row without EOS changes nothing.

The full blocks' FlexAttention path (slam_v1.doc_mask_flex; on CUDA from 2048 tokens on) is forced
on the CPU, where it runs eager and forward only (no FlexAttention backward there): its logits equal
the boolean masks' (MHA, GQA, position reset, one segment spanning the row), packed documents still
equal the documents alone, the BlockMask is the boolean mask tile for tile and skips tiles between
documents, no [B, 1, N, N] mask is built, and under context parallelism (CP=2, gloo) each rank's
logits and the loss equal the unsharded model's.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

from slam_pretrain.errors import ConfigError, UserError
from slam_pretrain.model import ModelConfig, SLAMv1LM, slam_v1
from slam_pretrain.model.kv_cache import prefill
from slam_pretrain.model.slam_v1 import doc_mask_flex, document_block_mask, document_ids, same_document_causal
from dist_utils import run_distributed
from train_utils import base_overrides, losses, run_train

EOS = 3
V = 61


def build(seed: int = 0, **kw) -> SLAMv1LM:
    base = dict(vocab_size=V, max_seq_len=160, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, ef_cycles=2,
                segment_len=16, overlap=4, doc_masking=True, eos_id=EOS)
    base.update(kw)
    torch.manual_seed(seed)
    return SLAMv1LM(ModelConfig(**base)).eval()


def doc(n: int, seed: int, eos: bool = True) -> list[int]:
    """A document of n tokens (no EOS inside), ending with EOS unless it runs past the row."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(4, V, (n - 1 if eos else n,), generator=g).tolist()
    return body + [EOS] if eos else body


def logits(model: SLAMv1LM, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]  # [N, V]


def test_document_ids_from_eos_with_a_continuation_at_the_row_start() -> None:
    row = torch.tensor([[7, 8, EOS, 9, EOS, EOS, 5, 6, 4], [EOS, 4, 4, 4, EOS, 4, 4, 4, 4]])
    d, pos = document_ids(row, EOS)
    # Row 0 starts inside a document of the previous row: tokens 0..2 are document 0 on their own.
    assert d.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 3], [0, 1, 1, 1, 1, 2, 2, 2, 2]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1, 2], [0, 0, 1, 2, 3, 0, 1, 2, 3]]


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_full_attention_packed_row_equals_each_document_alone(pos_encoding: str) -> None:
    docs = [doc(9, 1), doc(23, 2), doc(14, 3, eos=False)]  # offsets 0, 9, 32; the last runs past the row
    row = sum(docs, [])
    for reset in (True, False):
        m = build(segment_len=64, overlap=0, pos_encoding=pos_encoding, doc_position_reset=reset)
        assert m.ef_plan(len(row), torch.device("cpu")).k_odd == 0  # one segment: every attention is full
        packed = logits(m, row)
        off = 0
        for d in docs:
            alone = logits(m, d)
            got = packed[off:off + len(d)]
            if reset or pos_encoding == "rope" or off == 0:  # RoPE scores depend on relative positions only
                torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
            else:  # learned absolute positions: the document alone at its offset, behind a filler document
                assert (got - alone).abs().max() > 1e-3
                at_offset = logits(m, doc(off, 99) + d)[off:]
                torch.testing.assert_close(got, at_offset, rtol=0, atol=1e-5)
            off += len(d)


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
@pytest.mark.parametrize("reset", [False, True])
def test_ef_packed_row_equals_each_document_alone_at_its_offset(pos_encoding: str, reset: bool) -> None:
    check_ef_documents_alone_at_their_offsets(pos_encoding, reset)


def check_ef_documents_alone_at_their_offsets(pos_encoding: str, reset: bool) -> None:
    # S=16, O=4, T=12: segments [0,16) [12,28) [24,40) [36,52) [48,64) [60,76); overlaps [12,16) [24,28) ...
    m = build(pos_encoding=pos_encoding, doc_position_reset=reset)
    lengths = [11, 13, 13, 3, 8, 24]  # offsets 0, 11, 24, 37 (3 tokens inside the overlap [36,40)), 40, 48
    docs = [doc(n, 10 + i, eos=i < len(lengths) - 1) for i, n in enumerate(lengths)]
    row = sum(docs, [])
    assert m.ef_plan(len(row), torch.device("cpu")).k_odd >= 2
    packed = logits(m, row)
    off = 0
    for i, d in enumerate(docs):
        got = packed[off:off + len(d)]
        for filler_seed in (100, 200):  # whatever precedes it (one or several documents), as long as it ended
            filler = doc(off, filler_seed) if off else []
            if off > 6:  # a filler made of two documents too
                filler = doc(off // 2, filler_seed) + doc(off - off // 2, filler_seed + 1)
            alone = logits(m, filler + d)[off:]
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
        # And not merely close to anything: the model sees the document's tokens.
        changed = list(row)
        changed[off] = 4 if row[off] != 4 else 5
        assert (logits(m, changed)[off:off + len(d)] - got).abs().max() > 1e-4
        off += len(d)
    # Document 0 (offset 0) equals itself alone from position 0: nothing before it, later ones unseen.
    torch.testing.assert_close(packed[:lengths[0]], logits(m, docs[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_aligned_document_with_position_reset_equals_it_alone_from_zero(pos_encoding: str) -> None:
    # O = 0, S = 12: segments [0,12) A, [12,24) B, [24,36) A, ...; a document starting at 2S = 24
    # meets the same segments, through the same blocks, as when it runs alone from position 0.
    first, second = doc(24, 5), doc(30, 6, eos=False)  # the second spans segments [24,36) [36,48) [48,54)
    for reset in (True, False):
        m = build(segment_len=12, overlap=0, pos_encoding=pos_encoding, doc_position_reset=reset)
        got = logits(m, first + second)[24:]
        alone = logits(m, second)
        if reset or pos_encoding == "rope":
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
        else:
            assert (got - alone).abs().max() > 1e-3  # learned positions 24.. differ from 0..
    # Misaligned by S (block B where alone it was A): another function, as the global layout says.
    m = build(segment_len=12, overlap=0, pos_encoding=pos_encoding, doc_position_reset=True)
    assert (logits(m, doc(12, 7) + second)[12:] - logits(m, second)).abs().max() > 1e-3


def test_masking_off_lets_documents_see_each_other_and_on_changes_nothing_without_eos() -> None:
    row = doc(20, 1) + doc(30, 2, eos=False)
    other = doc(20, 3) + row[20:]  # another first document, same second one
    off = build(doc_masking=False)
    assert (logits(off, row)[20:] - logits(off, other)[20:]).abs().max() > 1e-3
    on = build(doc_masking=True)
    torch.testing.assert_close(logits(on, row)[20:], logits(on, other)[20:], rtol=0, atol=1e-5)
    # Without EOS the row is one document: the masks are plain causal ones.
    no_eos = [t if t != EOS else 4 for t in row]
    for reset in (False, True):
        torch.testing.assert_close(logits(build(doc_position_reset=reset), no_eos), logits(off, no_eos),
                                   rtol=0, atol=1e-5)


def test_masked_documents_get_no_gradient_from_each_other() -> None:
    m = build()
    x = torch.tensor([doc(20, 1) + doc(30, 2, eos=False)])
    emb = m.tok_emb(x).detach().requires_grad_(True)
    # Loss on the second document only: the first document's embeddings must get exactly zero gradient.
    m.tok_emb.forward = lambda _t: emb  # the real model, fed the leaf embeddings
    m(x)[0, 20:].square().sum().backward()
    assert emb.grad[0, :20].abs().max() == 0 and emb.grad[0, 20:].abs().max() > 0


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"model\.doc_position_reset=True is invalid: needs model\.doc_masking=true"):
        ModelConfig(doc_position_reset=True).validate()
    with pytest.raises(ConfigError, match=r"model\.eos_id=9000 is invalid: .*vocab_size=8192"):
        ModelConfig(doc_masking=True, eos_id=9000).validate()
    ModelConfig(eos_id=9000).validate()  # unused without doc masking


def test_kv_cache_and_hf_export_refuse_doc_masking() -> None:
    with pytest.raises(UserError, match="doc_masking=true: the KV cache does not apply document masking"):
        prefill(build(), [[5, 6, 7]], capacity=8)
    from slam_pretrain.downstream.hf_export import hf_config_dict

    import dataclasses
    with pytest.raises(UserError, match="doc_masking=true: the Hugging Face export does not implement"):
        hf_config_dict(dataclasses.asdict(ModelConfig(doc_masking=True)))
    assert "doc_masking" not in hf_config_dict(dataclasses.asdict(ModelConfig()))


def test_training_steps_with_doc_masking_through_the_cli(tiny_manifest, tmp_path) -> None:
    out = tmp_path / "run"
    args = base_overrides(tiny_manifest, out, steps=2, micro=2, global_batch=2, interval=2)
    r = run_train(1, args + ["--set", "model.doc_masking=true", "--set", "model.doc_position_reset=true"])
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(out)
    assert sorted(got) == [1, 2] and all(0 < v < 20 for v in got.values()), got
    saved = (out / "checkpoints" / "step_00000002" / "config.yaml").read_text()
    assert "doc_masking: true" in saved and "doc_position_reset: true" in saved
    # A EOS in this dataset really splits rows: the tokenizer prepare trained ends documents with id 3.
    manifest = json.loads(tiny_manifest.read_text())
    assert manifest["tokenizer"]["eos_id"] == EOS


# -- the full blocks through FlexAttention ----------------------------------------------------------

FLEX_WARNING = "ignore:flex_attention called without torch.compile"  # eager on the CPU: expected here


@pytest.fixture
def flex(monkeypatch):
    """Force the FlexAttention path (as SLAM_DOC_MASK_FLEX=on would) and count its attention calls."""
    monkeypatch.setattr(slam_v1, "DOC_MASK_FLEX", "on")
    calls = []
    real = slam_v1.flex_attend
    monkeypatch.setattr(slam_v1, "flex_attend", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    return calls


def packed_row() -> list[int]:
    lengths = [11, 13, 13, 3, 8, 24]  # as in the EF test: documents across segment edges, one inside an overlap
    return sum((doc(n, 10 + i, eos=i < len(lengths) - 1) for i, n in enumerate(lengths)), [])


@pytest.mark.filterwarnings(FLEX_WARNING)
@pytest.mark.parametrize("kw", [dict(num_kv_heads=4), dict(), dict(doc_position_reset=True),
                                dict(doc_position_reset=True, pos_encoding="learned"),
                                dict(segment_len=128, overlap=0)],
                         ids=["mha", "gqa", "reset-rope", "reset-learned", "one-segment"])
def test_flex_logits_equal_the_boolean_masks(flex, monkeypatch, kw) -> None:
    m = build(**kw)
    rows = torch.tensor([packed_row(), doc(30, 7) + doc(42, 8, eos=False)])  # [2, 72]: rows differ
    n = rows.shape[1]
    monkeypatch.setattr(slam_v1, "DOC_MASK_FLEX", "off")
    with torch.no_grad():
        want = m(rows)
    sizes = []  # every boolean mask the flex forward builds: EF segments only, never [N, N]
    monkeypatch.setattr(slam_v1, "same_document_causal", lambda d: sizes.append(d.shape[1]) or same_document_causal(d))
    monkeypatch.setattr(slam_v1, "DOC_MASK_FLEX", "on")
    with torch.no_grad():
        got = m(rows)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    one_segment = m.ef_plan(n, torch.device("cpu")).k_odd == 0
    # Initial and final blocks, and each EF cycle's one block call when one segment spans the row.
    assert len(flex) == (2 + m.config.ef_cycles if one_segment else 2), flex
    assert n not in sizes and (one_segment or sizes), sizes


@pytest.mark.filterwarnings(FLEX_WARNING)
def test_flex_packed_documents_equal_each_document_alone(flex) -> None:
    check_ef_documents_alone_at_their_offsets("rope", reset=False)  # as configs/long_context_32k.yaml
    assert flex  # the full blocks did run through FlexAttention


def test_block_mask_is_the_boolean_mask_and_skips_tiles_between_documents() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, V, (2, 300), generator=g)
    tokens[0, [40, 41, 170, 299]] = EOS
    tokens[1, [127]] = EOS  # row 1: documents [0, 128) and [128, 300), on a 128-token tile edge
    d, _ = document_ids(tokens, EOS)
    full = document_block_mask(d)  # [2, 1, 300, 300]
    assert torch.equal(create_mask(full.mask_mod, 2, 1, 300, 300, device="cpu"), same_document_causal(d))
    a, b = 100, 200  # a context-parallel chunk: queries [a, b) against keys [0, b), lower-right causal
    chunk = document_block_mask(d, a, b)
    causal = torch.ones(b - a, b, dtype=torch.bool).tril(diagonal=a)
    want = ((d[:, a:b, None] == d[:, None, :b]) & causal)[:, None]
    assert chunk.shape == (2, 1, b - a, b)
    assert torch.equal(create_mask(chunk.mask_mod, 2, 1, b - a, b, device="cpu"), want)
    # The 128 x 128 tiles FlexAttention computes ([B, 1, 3, 3] query x key tiles): the causal upper
    # triangle is skipped, and so is every tile between different documents (row 0: query tile 2 is
    # all in the document [171, 300), key tile 0 in others; row 1: its documents meet on a tile edge).
    tiles = full.to_dense()[:, 0].bool()
    assert tiles[0].tolist() == [[True, False, False], [True, True, False], [False, True, True]]
    assert tiles[1].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_the_flex_rule(monkeypatch) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert slam_v1.DOC_MASK_FLEX_MIN_LEN == 2048
    monkeypatch.setattr(slam_v1, "DOC_MASK_FLEX", "auto")
    assert doc_mask_flex(2048, cuda, 0.0) and not doc_mask_flex(2047, cuda, 0.0)
    assert not doc_mask_flex(32768, cpu, 0.0)
    assert not doc_mask_flex(32768, cuda, 0.1)  # FlexAttention has no dropout: boolean masks
    monkeypatch.setattr(slam_v1, "DOC_MASK_FLEX", "on")
    assert doc_mask_flex(16, cpu, 0.0) and not doc_mask_flex(16, cpu, 0.1)
    monkeypatch.setattr(slam_v1, "DOC_MASK_FLEX", "off")
    assert not doc_mask_flex(32768, cuda, 0.0)
    monkeypatch.setattr(slam_v1, "DOC_MASK_FLEX", "yes")
    with pytest.raises(UserError, match="SLAM_DOC_MASK_FLEX='yes' is invalid: auto, on or off"):
        doc_mask_flex(16, cpu, 0.0)


@pytest.mark.filterwarnings(FLEX_WARNING)
def test_flex_forced_with_dropout_trains_through_the_boolean_masks(flex) -> None:
    m = build(dropout=0.1).train()
    x = torch.tensor([doc(20, 1) + doc(30, 2, eos=False)])
    m(x).sum().backward()  # FlexAttention has neither dropout nor a CPU backward: this is the SDPA path
    assert not flex
    with torch.no_grad():
        m.eval()(x)
    assert len(flex) == 2  # in eval, no dropout: the forced FlexAttention path


# (name, model overrides, sequence length) for context parallelism: chunks of C = N / 4 tokens.
CP_CASES = [
    ("gqa", dict(segment_len=12, overlap=4, num_kv_heads=2), 64),  # two EF segments per chunk
    ("reset-one-segment-chunks", dict(segment_len=12, overlap=4, doc_position_reset=True), 32),  # C = T
]


def _cp2_flex_matches_unsharded(info, cases):
    """On each rank: CP=2 through FlexAttention against the unsharded model through boolean masks,
    forward only (no FlexAttention backward on the CPU): this rank's logits and the mean loss."""
    import torch.distributed as dist

    from slam_pretrain.engine.context_parallel import apply_context_parallel, build_mesh
    from slam_pretrain.model import sequence_shard
    from test_context_parallel import _batch, _tiny

    mesh = build_mesh(info, 2)
    out = {}
    for name, kw, n in cases:
        ref = SLAMv1LM(_tiny(doc_masking=True, **kw))
        ref.init_weights(seed=1)  # the same weights on both ranks
        model = SLAMv1LM(_tiny(doc_masking=True, **kw))
        model.load_state_dict(ref.state_dict())
        shard = apply_context_parallel(model, mesh)
        tokens, targets = _batch(n)
        with torch.no_grad():
            slam_v1.DOC_MASK_FLEX = "off"
            ref_logits, ref_loss = ref(tokens, targets)
            slam_v1.DOC_MASK_FLEX = "on"
            fwd, _, _ = sequence_shard.prepare(model, tokens)
            assert all(isinstance(m, BlockMask) for m in fwd.attention.masks)
            logits, loss = model(tokens, targets)
        mean_loss = loss.clone()
        dist.all_reduce(mean_loss)
        want = ref_logits[:, shard.positions(n, tokens.device)]  # this rank's positions
        out[name] = {"logits_err": (logits - want).abs().max().item(),
                     "loss_err": abs(mean_loss.item() / 2 - ref_loss.item()) / ref_loss.item()}
    return out


def test_context_parallel_flex_matches_the_unsharded_model() -> None:
    results = run_distributed(_cp2_flex_matches_unsharded, world_size=2, args=(CP_CASES,),
                              env={"PYTHONWARNINGS": "ignore"})
    for rank in results:
        for name, r in rank.items():
            assert r["logits_err"] < 1e-5 and r["loss_err"] < 1e-5, (name, r)
