"""Staged context extension (train.seq_len_schedule): phases of sequence length and RoPE scaling.

1. The loader cuts rows prepared at data.seq_len into pieces: over an epoch the pieces put back
   together are exactly the prepared rows, in the uncut order (1 and 2 ranks, with a worker), and
   a change of length between batches (a phase switch, or a resume after one) continues at the same
   row position.
2. YaRN: factor 1 is plain RoPE bit for bit; hand-computed values at a few positions; the same
   frequencies and attention factor as transformers' reference implementation; the Hugging Face
   export's standalone copy gives the same logits; the KV cache decodes YaRN like the full forward;
   changing the RoPE settings of a live model never reuses the old factors.
3. Config: a schedule is checked on load, each mistake one line naming the key.
4. Through the real CLI: phases 64 -> 128 tokens (YaRN), killed right after the switch and again
   mid-phase, resumed: per-step losses bitwise equal to an uninterrupted run, one event record per
   phase, seq_len in every record, tokens per step constant, the LR schedule continuous.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline import DataError, build_loader, load_manifest
from slam_pretrain.config import load_config
from slam_pretrain.errors import ConfigError
from slam_pretrain.model import ModelConfig, SLAMv1LM, rope_freqs
from slam_pretrain.training.context_schedule import model_section_at, phase_at
from train_utils import REPO, base_overrides, latest_step, run_and_kill, run_train

SEED = 7
SCHEDULE = "train.seq_len_schedule=[{name: short, until_step: 4, seq_len: 64}, " \
           "{name: long, seq_len: 128, rope: {type: yarn, factor: 2, original_max_len: 64}}]"


# ---------------------------------------------------------------------------------------------
# 1. Row cutting in the loader.

def _full_rows(batch: dict, cut: int) -> list[bytes]:
    """The prepared rows a batch of pieces came from (pads restored), rebuilt twice: from the
    inputs plus the last label, and from the first input plus every label; both must agree, which
    holds only if consecutive pieces continue each other with no token repeated or left out."""
    x, y = batch["input_ids"], torch.where(batch["labels"] == -100, 0, batch["labels"])
    b = x.shape[0] // cut
    xs, ys = x.reshape(b, -1), y.reshape(b, -1)
    from_inputs = torch.cat([xs, ys[:, -1:]], dim=1)
    from_labels = torch.cat([xs[:, :1], ys], dim=1)
    assert torch.equal(from_inputs, from_labels), "pieces of a row do not continue each other"
    return [r.numpy().astype(np.int64).tobytes() for r in from_inputs]


def _all_train_rows(manifest: Path) -> Counter:
    """Every prepared training row, read with the plain webdataset pipeline (not our loader)."""
    m = load_manifest(manifest)
    ds = wds.WebDataset([s.location for s in m.splits["train"].shards], shardshuffle=False, empty_check=False).decode()
    return Counter(s["tokens.npy"].astype(np.int64).tobytes() for s in ds)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 1)])
def test_cut_rows_cover_the_epoch_exactly_in_the_prepared_order(tiny_manifest, world, workers):
    cut = 4
    plain = [build_loader(tiny_manifest, rank=r, world_size=world, micro_batch_size=3, seed=SEED, num_workers=0)
             for r in range(world)]
    pieces = [build_loader(tiny_manifest, rank=r, world_size=world, micro_batch_size=3, seed=SEED,
                           num_workers=workers) for r in range(world)]
    for ld in pieces:
        ld.set_seq_len(128 // cut)
        assert ld.seq_len == 32 and ld.row_len == 128
    seq_plain: list[bytes] = []
    seq_cut: list[bytes] = []
    per_rank_plain, per_rank_cut = [list(ld) for ld in plain], [list(ld) for ld in pieces]
    for k in range(len(per_rank_plain[0])):  # the global order: round k, rank 0 then rank 1
        for r in range(world):
            bp, bc = per_rank_plain[r][k], per_rank_cut[r][k]
            assert bc["input_ids"].shape == (3 * cut, 32) and bc["labels"].shape == (3 * cut, 32)
            assert torch.equal(bc["input_ids"].reshape(3, 128), bp["input_ids"])
            assert torch.equal(bc["labels"].reshape(3, 128), bp["labels"])
            seq_plain += _full_rows(bp, 1)
            seq_cut += _full_rows(bc, cut)
    assert seq_cut == seq_plain  # the same rows in the same order
    n = plain[0].num_rows
    assert Counter(seq_cut[:n]) == _all_train_rows(tiny_manifest)  # one epoch: every row exactly once
    assert {ld.position for ld in pieces} == {ld.position for ld in plain}  # counted in prepared rows


def test_padded_row_stays_masked_when_cut(tiny_manifest):
    whole = build_loader(tiny_manifest, rank=0, world_size=1, micro_batch_size=64, seed=SEED, num_workers=0)
    cut = build_loader(tiny_manifest, rank=0, world_size=1, micro_batch_size=64, seed=SEED, num_workers=0)
    cut.set_seq_len(16)
    masked_whole = sum(int((b["labels"] == -100).sum()) for b in whole)
    masked_cut = sum(int((b["labels"] == -100).sum()) for b in cut)
    assert masked_whole > 0 and masked_cut == masked_whole


def test_switch_between_batches_and_resume_after_it_continue_at_the_same_row(tiny_manifest):
    def loader():
        return build_loader(tiny_manifest, rank=0, world_size=1, micro_batch_size=2, seed=SEED, num_workers=0)

    ref_it = iter(loader())
    ref = [next(ref_it) for _ in range(6)]  # uncut: rows of 128
    # A switch inside a running iteration (the trainer's step boundary): 64 for 3 batches, then 128.
    live = loader()
    live.set_seq_len(64)
    it = iter(live)
    short = [next(it) for _ in range(3)]
    state = live.state_dict()
    live.set_seq_len(128)
    assert torch.equal(next(it)["input_ids"], ref[3]["input_ids"])
    for k in range(3):
        assert torch.equal(short[k]["input_ids"].reshape(2, 128), ref[k]["input_ids"])
    # A resumed run: the state saved at the switch, loaded into a new loader that starts at 128.
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_seq_len(128)
    it2 = iter(resumed)
    for k in (3, 4, 5):
        b = next(it2)
        assert torch.equal(b["input_ids"], ref[k]["input_ids"]) and torch.equal(b["labels"], ref[k]["labels"])


def test_a_length_that_does_not_divide_the_rows_is_one_line(tiny_manifest):
    ld = build_loader(tiny_manifest, rank=0, world_size=1, micro_batch_size=2, seed=SEED, num_workers=0)
    for bad in (48, 0, 256):
        with pytest.raises(DataError) as e:
            ld.set_seq_len(bad)
        assert "\n" not in str(e.value) and f"seq_len={bad}" in str(e.value) and "128" in str(e.value)
    assert ld.seq_len == 128


# ---------------------------------------------------------------------------------------------
# 2. YaRN.

def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, max_seq_len=256, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96, ef_cycles=2,
                segment_len=24, overlap=4, init_std=0.2)
    return ModelConfig(**{**base, **kw})


YARN = dict(rope_scaling_type="yarn", rope_scaling=4.0, rope_original_max_len=64)


def test_yarn_factor_one_is_plain_rope():
    pos = torch.arange(300)
    plain = rope_freqs(pos, _cfg())
    assert torch.equal(rope_freqs(pos, _cfg(rope_scaling_type="yarn", rope_scaling=1.0, rope_original_max_len=64)),
                       plain)


def test_yarn_known_values():
    """head_dim 16, theta 1e4, L0 64, s 4. Pair j turns 64 w_j / 2pi times over L0; the ramp bounds
    are pair(32 turns) = 16 ln(64 / 64pi) / 2 ln(1e4) = -0.99 -> 0 and pair(1 turn) = 2.02 -> 3, so
    pairs 0, 1, 2, 3.. keep 1, 2/3, 1/3, 0 of their frequency and take the rest from w_j / 4:
    w'_j = w_j (1 - r_j + r_j / 4) with r = 0, 1/3, 2/3, 1, 1, ...; every factor has magnitude
    0.1 ln 4 + 1 = 1.138629."""
    f = rope_freqs(torch.tensor([10, 100]), _cfg(**YARN))  # [2, 8]
    mscale = 0.1 * math.log(4) + 1
    assert torch.allclose(f.abs(), torch.full((2, 8), mscale), atol=1e-6)
    expected = {  # (position, pair): angle in radians, from w_j = 1e4^(-j/8)
        (10, 0): 10.0,                       # r 0: 10 * 1
        (10, 1): 10 * 10 ** -0.5 * 0.75,     # r 1/3: 2.371708
        (100, 2): 100 * 0.1 * 0.5,           # r 2/3: 100 * 1e4^(-1/4) * (1/3 + 2/12) = 5.0
        (100, 3): 100 * 10 ** -1.5 / 4,      # r 1: 0.790569
        (100, 7): 100 * 10 ** -3.5 / 4,      # r 1: 0.0079057
    }
    for (p, j), angle in expected.items():
        got = f[0 if p == 10 else 1, j]
        want = complex(mscale * math.cos(angle), mscale * math.sin(angle))
        assert abs(complex(got) - want) < 2e-5, (p, j, complex(got), want)
    assert torch.allclose(rope_freqs(torch.tensor([7]), _cfg(**YARN, rope_yarn_attn_factor=1.0)).abs(),
                          torch.ones(1, 8), atol=1e-6)


def test_yarn_matches_the_transformers_reference():
    transformers = pytest.importorskip("transformers", reason="the 'hf' extra (make test installs it)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for theta, l0, s, fast, slow in [(1e4, 64, 4.0, 32.0, 1.0), (5e5, 4096, 8.0, 16.0, 2.0)]:
        cfg = _cfg(d_model=128, num_heads=4, rope_theta=theta, rope_scaling_type="yarn", rope_scaling=s,
                   rope_original_max_len=l0, rope_yarn_beta_fast=fast, rope_yarn_beta_slow=slow)
        hf_cfg = transformers.LlamaConfig(
            hidden_size=128, num_attention_heads=4, max_position_embeddings=int(l0 * s),
            rope_parameters={"rope_type": "yarn", "rope_theta": theta, "factor": s,
                             "original_max_position_embeddings": l0, "beta_fast": fast, "beta_slow": slow})
        inv_freq, attn = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
        pos = torch.tensor([1.0, 777.0])
        ours = rope_freqs(pos, cfg)
        assert torch.allclose(ours.abs(), torch.full_like(ours.abs(), attn), atol=1e-6)
        want = torch.polar(torch.full((2, 16), attn), pos[:, None] * inv_freq.float())
        assert torch.allclose(ours, want, atol=5e-4), (ours - want).abs().max()


def test_hf_export_copy_gives_the_same_logits_with_yarn(tmp_path):
    pytest.importorskip("transformers", reason="the 'hf' extra (make test installs it)")
    from slam_pretrain.downstream.hf.configuration_slam import SLAMConfig
    from slam_pretrain.downstream.hf.modeling_slam import SLAMForCausalLM
    from slam_pretrain.downstream.hf_export import hf_config_dict

    cfg = _cfg(**YARN, rope_yarn_beta_fast=16.0, rope_yarn_attn_factor=1.2)
    torch.manual_seed(0)
    ours = SLAMv1LM(cfg).eval()
    SLAMConfig(**hf_config_dict(dataclasses.asdict(cfg))).save_pretrained(str(tmp_path))
    hf_cfg = SLAMConfig.from_pretrained(str(tmp_path))  # the YaRN fields survive config.json
    assert (hf_cfg.rope_scaling_type, hf_cfg.rope_original_max_len, hf_cfg.rope_yarn_attn_factor) == ("yarn", 64, 1.2)
    hf = SLAMForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict())
    x = torch.randint(0, 97, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), hf(input_ids=x).logits
        plain = SLAMv1LM(dataclasses.replace(cfg, rope_scaling_type="linear", rope_scaling=1.0))
        plain.load_state_dict(ours.state_dict())
        c = plain.eval()(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert not torch.allclose(a, c, atol=1e-3)  # YaRN is in effect (not silently plain RoPE)


def test_kv_cache_decodes_yarn_like_the_full_forward():
    from slam_pretrain.model.kv_cache import decode_step, prefill

    torch.manual_seed(0)
    model = SLAMv1LM(_cfg(**YARN)).eval()
    x = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        last, cache = prefill(model, [x[0, :60].tolist()], capacity=90)
        steps = [last] + [decode_step(model, cache, x[:, i]) for i in range(60, 89)]
    assert torch.allclose(torch.stack(steps, 1)[0], full[0, 59:89], atol=1e-4)


def test_rope_change_on_a_live_model_never_reuses_old_factors():
    torch.manual_seed(0)
    model = SLAMv1LM(_cfg()).eval()
    x = torch.randint(0, 97, (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)  # caches the plan of n = 96 with plain RoPE
        model.config = dataclasses.replace(model.config, **YARN)  # what a phase switch does
        after = model(x)
        fresh = SLAMv1LM(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(after, fresh(x))
        assert not torch.allclose(before, after, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# 3. Config.

TINY = str(REPO / "configs" / "tiny_cpu.yaml")


def test_a_schedule_loads_into_phases():
    cfg = load_config(TINY, ["train.max_steps=10", SCHEDULE])
    short, long = cfg.train.phases()
    assert (short.name, short.first_step, short.last_step, short.seq_len, short.rope) == ("short", 1, 4, 64, None)
    assert (long.first_step, long.last_step, long.seq_len) == (5, None, 128)
    assert long.rope["rope_scaling_type"] == "yarn" and long.rope["rope_original_max_len"] == 64
    assert [phase_at(cfg.train.phases(), s).name for s in (1, 4, 5, 10, 11)] == ["short"] * 2 + ["long"] * 3
    section = cfg.to_dict()
    assert model_section_at(section, 4)["rope_scaling_type"] == "linear"  # weights after step 4: short phase
    at8 = model_section_at(section, 8)
    assert (at8["rope_scaling_type"], at8["rope_scaling"], at8["rope_original_max_len"]) == ("yarn", 2.0, 64)
    assert model_section_at(load_config(TINY).to_dict(), 8) == load_config(TINY).to_dict()["model"]
    based = load_config(TINY, ["train.seq_len_schedule=[{seq_len: 128, rope: {type: none, theta: 5.0e+5}}]"])
    assert model_section_at(based.to_dict(), 1)["rope_theta"] == 5e5 and based.model.rope_theta == 1e4


@pytest.mark.parametrize("schedule,key,valid", [
    ("[{until_step: 4, seq_len: 48}, {seq_len: 128}]", "train.seq_len_schedule[0].seq_len=48",
     "divide data.seq_len=128"),
    ("[{until_step: 4, seq_len: 64}, {seq_len: 256}]", "train.seq_len_schedule[1].seq_len=256", "divide"),
    ("[{seq_len: 64}, {seq_len: 128}]", "train.seq_len_schedule[0].until_step", "every phase but the last"),
    ("[{until_step: 6, seq_len: 64}, {until_step: 5, seq_len: 128}]", "train.seq_len_schedule[1].until_step=5",
     ">= 7"),
    ("[{until_step: 4, seq_len: 64}, {until_step: 8, seq_len: 128}]", "train.seq_len_schedule[1].until_step=8",
     "train.max_steps=300"),
    ("[{until: 4, seq_len: 64}, {seq_len: 128}]", "train.seq_len_schedule[0].until", "did you mean 'until_step'"),
    ("[{until_step: 4, seq_len: 64}, {seq_len: 128, rope: {type: yarn, factor: 2}}]",
     "train.seq_len_schedule[1].rope.original_max_len", "YaRN needs"),
    ("[{until_step: 4, seq_len: 64}, {seq_len: 128, rope: {type: ntk, factor: 2}}]",
     "train.seq_len_schedule[1].rope.type='ntk'", "'none', 'linear', 'yarn'"),
    ("[{until_step: 4, seq_len: 64}, {seq_len: 128, rope: {type: linear, factr: 2}}]",
     "train.seq_len_schedule[1].rope.factr", "did you mean 'factor'"),
    ("[{until_step: 4, seq_len: 64}, {seq_len: 128, rope: {type: yarn, factor: 2, original_max_len: 64, "
     "beta_fast: 1, beta_slow: 2}}]", "train.seq_len_schedule[1].rope.beta_slow=2", "below beta_fast=1"),
    ("{seq_len: 64}", "train.seq_len_schedule={'seq_len': 64}", "expected list"),
])
def test_schedule_mistakes_are_one_line_naming_the_key(schedule, key, valid):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"train.seq_len_schedule={schedule}"])
    msg = str(e.value)
    assert "\n" not in msg and key in msg and valid in msg, msg


def test_learned_positions_have_no_rope_to_scale_and_yarn_needs_its_length():
    with pytest.raises(ConfigError, match=r"seq_len_schedule\[1\]\.rope is invalid: model.pos_encoding='learned'"):
        load_config(TINY, ["model.pos_encoding=learned", "train.seq_len_schedule=[{until_step: 4, seq_len: 64}, "
                           "{seq_len: 128, rope: {type: linear, factor: 2}}]"])
    with pytest.raises(ConfigError, match=r"^model.rope_original_max_len=None is invalid: rope_scaling_type='yarn'"):
        load_config(TINY, ["model.rope_scaling_type=yarn", "model.rope_scaling=2"])
    with pytest.raises(ConfigError, match=r"model.rope_scaling_type='ntk' is invalid"):
        load_config(TINY, ["model.rope_scaling_type=ntk"])


# ---------------------------------------------------------------------------------------------
# 4. Exact resume across a phase switch, through the real CLI.

def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _switched(out: Path) -> bool:
    """The run has entered the second phase (its event record is in metrics.jsonl)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if rec.get("event") == "context_phase" and rec.get("step") == 5:
            return True
    return False


def _ok(r) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"


def test_kill_right_after_the_switch_and_mid_phase_resumes_bitwise(tmp_path, tiny_manifest):
    def args(out: Path) -> list[str]:
        return base_overrides(tiny_manifest, out, steps=8, micro=4, global_batch=8, interval=2) + [
            "--set", SCHEDULE, "--set", "train.eval_interval=4"]

    straight = tmp_path / "straight"
    _ok(run_train(1, args(straight)))

    out = tmp_path / "killed"
    rc, log = run_and_kill(1, args(out), out, when=_switched)
    assert rc == -9, f"the run was not killed after the switch (exit {rc}):\n{log[-3000:]}"
    assert latest_step(out) == 4  # the switch's boundary: the last step of the short phase
    rc, log = run_and_kill(1, args(out), out, when=lambda d: latest_step(d) == 6)  # mid-way through the long phase
    assert rc == -9 and "resumed from step 4 (" in log, log[-3000:]
    r = run_train(1, args(out))
    _ok(r)
    assert "resumed from step 6 (" in r.stdout

    got, want = _records(out), _records(straight)
    train = {rec["step"]: rec for rec in got if "event" not in rec and rec.get("split") != "val"}
    ref = {rec["step"]: rec for rec in want if "event" not in rec and rec.get("split") != "val"}
    assert sorted(train) == list(range(1, 9))
    assert {s: rec["loss"] for s, rec in train.items()} == {s: rec["loss"] for s, rec in ref.items()}  # bitwise
    val = [(rec["step"], rec["val_loss"], rec["seq_len"]) for rec in got if rec.get("split") == "val"]
    assert val == [(rec["step"], rec["val_loss"], rec["seq_len"]) for rec in want if rec.get("split") == "val"]
    assert [(step, seq_len) for step, _, seq_len in val] == [(4, 64), (8, 128)]  # each at its phase's length
    events = [(e["step"], e["phase"], e["seq_len"], e["sequences_per_row"], e["rope"]) for e in got if "event" in e]
    assert events == [(1, 0, 64, 2, "plain"), (5, 1, 128, 1, "yarn x2 from 64")]
    assert [e for e in got if "event" in e] == [e for e in want if "event" in e]
    assert [train[s]["seq_len"] for s in range(1, 9)] == [64] * 4 + [128] * 4
    assert [train[s]["tokens"] for s in range(1, 9)] == [s * 8 * 128 for s in range(1, 9)]  # tokens per step constant
    from slam_pretrain.engine.optim import lr_at

    t = load_config(out / "checkpoints" / "step_00000008" / "config.yaml").train
    assert [train[s]["lr"] for s in range(1, 9)] == [lr_at(s - 1, t) for s in range(1, 9)]  # no restart at step 5
