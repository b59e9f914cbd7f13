"""The stability switches of long-context recipes (issue 13, part 5): ``model.qk_norm`` (RMSNorm over
head_dim of every head's q and k, before RoPE) and ``train.z_loss`` (coefficient x
mean(logsumexp(logits)^2), PaLM). fp32, CPU; the last tests run the real CLI and the HF export."""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
import torch.nn.functional as F

from slam_pretrain.config import load_config
from slam_pretrain.errors import ConfigError
from slam_pretrain.model import ModelConfig, SLAMv1LM, count_params
from test_kv_cache import assert_cache_matches_full_forward
from slam_pretrain.training.callbacks import ZLossCallback

from train_utils import REPO, base_overrides, env_for_tests, losses, run_train

# S=12, O=3, T=9 (as tests/test_kv_cache.py): overlaps [9, 12), [18, 21), ...
BASE = dict(vocab_size=64, max_seq_len=96, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48, ef_cycles=2,
            segment_len=12, overlap=3)


def build(**kw) -> SLAMv1LM:
    torch.manual_seed(0)
    return SLAMv1LM(ModelConfig(**{**BASE, **kw})).eval()


# -- QK-norm ------------------------------------------------------------------------------------

def test_qk_norm_parameters_and_normalised_heads() -> None:
    off, on = build(), build(qk_norm=True)
    blocks = 2 + 2 * BASE["ef_cycles"]
    hd = BASE["d_model"] // BASE["num_heads"]
    assert count_params(on) - count_params(off) == blocks * 2 * hd  # one [hd] weight each for q and k
    assert count_params(on.config) == count_params(on) and count_params(off.config) == count_params(off)
    names = [n for n, _ in on.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(names) == blocks * 2
    assert on.initial_block.attn.q_norm is not None and off.initial_block.attn.q_norm is None
    assert all(torch.equal(on.get_parameter(n), torch.ones(hd)) for n in names)  # init_spec: norm weights 1
    # The trunk's other weights are the same draws (per-name seeding): only the norm differs.
    sd_off = off.state_dict()
    assert all(torch.equal(v, sd_off[k]) for k, v in on.state_dict().items() if k in sd_off)
    # Every head's q and k leave project() with RMS 1 over head_dim (RoPE keeps the norm).
    attn = on.initial_block.attn
    x = torch.randn(2, 10, BASE["d_model"], generator=torch.Generator().manual_seed(1)) * 7.0
    with torch.no_grad():
        q, k, v = attn.project(x, on.ef_plan(10, x.device).rope_full)
        q0, k0, _ = off.initial_block.attn.project(x, off.ef_plan(10, x.device).rope_full)
    assert q.shape == (2, 4, 10, hd) and k.shape == (2, 2, 10, hd)
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 4, 10), rtol=0, atol=1e-3)  # eps/ms off 1
    torch.testing.assert_close(k.pow(2).mean(-1), torch.ones(2, 2, 10), rtol=0, atol=1e-3)
    assert (q0.pow(2).mean(-1) - 1).abs().max() > 0.1  # without it they are not
    torch.testing.assert_close(q, q0 * torch.rsqrt(q0.pow(2).mean(-1, keepdim=True) + 1e-5), rtol=0, atol=1e-5)


def test_qk_norm_changes_logits() -> None:
    """Same seed, same other weights (see above): the logits differ only through the normalisation."""
    x = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        off, on = build()(x), build(qk_norm=True)(x)
    assert torch.isfinite(on).all() and (on - off).abs().max() > 1e-2


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_qk_norm_is_prefix_consistent_and_cache_equals_full_forward(pos: str) -> None:
    """tests/test_kv_cache.py's contract with QK-norm on: prefixes, then prefill + decoding past
    many segment boundaries, each step's logits equal to the full forward's."""
    model = build(qk_norm=True, pos_encoding=pos)
    n = 90
    x = torch.randint(0, 64, (3, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        for m in (1, 9, 11, 19, 47, 89):
            torch.testing.assert_close(model(x[:, :m]), full[:, :m], rtol=0, atol=1e-5)
    assert_cache_matches_full_forward(model, n)


# -- z-loss -------------------------------------------------------------------------------------

def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 64, (3, 30), generator=g)
    t = torch.randint(0, 64, (3, 30), generator=g)
    t[0, :7] = -100  # ignored targets: not in either mean
    t[2, 20:] = -100
    return x, t


def _grads(model: SLAMv1LM) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_z_loss_adds_exactly_coefficient_times_mean_lse_squared() -> None:
    coef = 0.05  # large enough that the z-term's gradient is far above fp32 noise
    x, t = _batch()
    model = build(init_std=0.2).train()  # dropout 0: train mode computes the same logits
    # Off: the plain CE, its gradients.
    _, ce = model(x, t)
    ce.backward()
    g_ce = _grads(model)
    assert model.pop_z_loss_stats() is None  # off: nothing computed, nothing kept
    # On: the returned loss is still exactly the CE; the gradient is that of CE + z-loss.
    model.z_loss = coef
    _, loss = model(x, t)
    assert torch.equal(loss.detach(), ce.detach())
    loss.backward()
    g_z = _grads(model)
    stats = model.pop_z_loss_stats()
    assert model.pop_z_loss_stats() is None  # taken once
    # Independently: log-sum-exp of the kept rows' logits, their mean square, the sum's gradients.
    model.z_loss = 0.0
    logits = model(x).float()
    keep = t != -100
    lse = torch.logsumexp(logits[keep], dim=-1)  # [kept tokens]
    ref = F.cross_entropy(logits[keep], t[keep]) + coef * lse.pow(2).mean()
    ref.backward()
    g_ref = _grads(model)
    assert int(keep.sum()) == 3 * 30 - 7 - 10
    assert stats.dtype == torch.float64 and stats[1].item() == keep.sum().item()
    assert stats[0].item() == pytest.approx(lse.pow(2).sum().item(), rel=1e-6)
    assert stats[0].item() / stats[1].item() > 16  # lse ~ ln 64 + ...: a real z, not zeros
    moved = 0.0
    for name in g_ref:
        torch.testing.assert_close(g_z[name], g_ref[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (g_z[name] - g_ce[name]).abs().max().item())
    assert moved > 1e-4  # the z-term really changed the gradients


def test_z_loss_only_in_training_and_callback_reports_token_mean() -> None:
    coef = 1e-4
    x, t = _batch()
    model = build()
    cb = ZLossCallback(model, coef)  # sets the coefficient on the model
    assert model.z_loss == coef
    with torch.no_grad():
        _, val = model(x, t)  # eval mode (validation): plain CE, nothing accumulated
        assert model.z_loss_stats is None
        model.train()
        lse2 = []
        for rows in (slice(0, 1), slice(1, 3)):  # two micro-batches of different token counts
            _, loss = model(x[rows], t[rows])
            keep = t[rows] != -100
            lse2.append(torch.logsumexp(model(x[rows])[keep].float(), -1).pow(2))
    assert torch.equal(val, F.cross_entropy(build()(x).view(-1, 64), t.view(-1), ignore_index=-100))
    rec = cb.metrics(trainer=None)  # one process: the all-reduce is the identity
    want = coef * torch.cat(lse2).mean().item()  # over tokens, not the mean of the two means
    assert rec["z_loss"] == pytest.approx(want, rel=1e-6)
    assert rec["z_loss"] != pytest.approx(coef * sum(v.mean().item() for v in lse2) / 2, rel=1e-4)
    assert cb.metrics(trainer=None) == {"z_loss": None}  # a window without training forwards


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["train.z_loss=-1e-4"])
    msg = str(e.value)
    assert "\n" not in msg and "train.z_loss=-0.0001" in msg and ">= 0" in msg
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.qk_norm=maybe"])
    assert "\n" not in str(e.value) and "model.qk_norm='maybe'" in str(e.value) and "bool" in str(e.value)
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["model.qk_norm=true", "train.z_loss=1e-4"])
    assert cfg.model.qk_norm is True and cfg.train.z_loss == 1e-4
    r = subprocess.run([sys.executable, "-m", "slam_pretrain", "train", "--config", "configs/tiny_cpu.yaml",
                        "--set", "train.z_loss=-1", "--dry-run"], cwd=REPO, env=env_for_tests(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "train.z_loss=-1" in r.stderr, r.stderr


# -- the real CLI -------------------------------------------------------------------------------

def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if "event" not in json.loads(line) and json.loads(line).get("split") != "val"]


def test_cli_training_with_both_switches(tiny_manifest, tmp_path: Path) -> None:
    """3 steps with QK-norm and z-loss 1e-4 against the same run without z-loss: step 1's loss is the
    same bits (the reported loss stays the CE of the same weights), later steps differ (the z-loss
    is in the gradient), and every record has z_loss, about 1e-4 x ln(2048)^2 at init."""
    runs = {}
    for name, z in (("z", "1e-4"), ("plain", "0")):
        out = tmp_path / name
        r = run_train(1, base_overrides(tiny_manifest, out, steps=3, interval=0)
                      + ["--set", "model.qk_norm=true", "--set", f"train.z_loss={z}"])
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        runs[name] = out
    recs = _records(runs["z"])
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all("z_loss" not in r for r in _records(runs["plain"]))
    lse2_init = math.log(2048) ** 2  # logits near 0 at init: log Z ~ ln V
    for rec in recs:
        assert math.isfinite(rec["z_loss"]) and abs(rec["z_loss"] / 1e-4 - lse2_init) < 0.2 * lse2_init, rec
    with_z, plain = losses(runs["z"]), losses(runs["plain"])
    assert with_z[1] == plain[1]
    assert with_z[3] != plain[3]
    saved = yaml.safe_load((runs["z"] / "config.yaml").read_text())
    assert saved["model"]["qk_norm"] is True and saved["train"]["z_loss"] == 1e-4


# -- the Hugging Face export --------------------------------------------------------------------

def test_hf_export_of_a_qk_norm_model_gives_the_same_logits(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="the 'hf' extra (make test installs it)")
    # transformers' remote-code module cache in a private folder (as tests/test_hf_export.py)
    hf_tmp = tempfile.mkdtemp(prefix="slam-hf-qk-")
    atexit.register(shutil.rmtree, hf_tmp, ignore_errors=True)
    os.environ.setdefault("HF_MODULES_CACHE", os.path.join(hf_tmp, "modules"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from data_pipeline.tokenizer import Tokenizer
    from hf_assets import train_tokenizer
    from slam_pretrain.downstream.hf_export import write_hf_folder

    vocab = 400
    tok = Tokenizer(train_tokenizer(tmp_path / "tok.model", vocab))
    ours = build(vocab_size=vocab, qk_norm=True, init_std=0.3)
    with torch.no_grad():  # norm weights away from 1, so a wrongly mapped or ignored weight shows
        for name, p in ours.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path / "hf"
    out.mkdir()
    write_hf_folder(ours, tok, dataclasses.asdict(ours.config), out)
    assert json.loads((out / "config.json").read_text())["qk_norm"] is True
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    x = torch.randint(4, vocab, (2, 60), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(x)
        torch.testing.assert_close(hf(x).logits, full, rtol=0, atol=1e-5)
        out_ = hf(x[:, :5], use_cache=True)  # and through its KV cache, one token at a time
        cache, steps = out_.past_key_values, [out_.logits]
        for t in range(5, 60):
            out_ = hf(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out_.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)
