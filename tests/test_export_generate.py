"""Export and generation: a real checkpoint (DeepSpeed engine + CheckpointManager, world 1, tiny
model, two optimizer steps) is exported to safetensors; the export's logits equal the checkpoint's
and the training process's own; greedy generation is deterministic; CLI mistakes are one line with
exit code 2. The tokenizer (trained at test time on a few standard-library files) and the
checkpoint come from hf_assets, as in the Hugging Face export and lm-eval tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_assets import REPO, make_checkpoints, run_config, train_tokenizer
from slam_pretrain.model import ModelConfig, SLAMv1LM

TINY = dict(vocab_size=384, max_seq_len=32, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, ef_cycles=2,
            segment_len=12, overlap=2, tie_embeddings=True)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "slam_pretrain", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    """A 384-piece BPE tokenizer trained on a few stdlib modules (deterministic, < 2 s)."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", TINY["vocab_size"])


def _tiny_model(seed: int = 0) -> SLAMv1LM:
    torch.manual_seed(seed)
    return SLAMv1LM(ModelConfig(**TINY)).eval()


# ---------------------------------------------------------------------------------------------
# Generation on an in-memory model (no checkpoint needed).

def test_generate_greedy_and_seeded_sampling(tokenizer_path: Path) -> None:
    from data_pipeline.tokenizer import Tokenizer
    from slam_pretrain.downstream.generate import generate, generate_ids

    tok, model = Tokenizer(tokenizer_path), _tiny_model()
    prompt = "def main("
    greedy = generate(model, tok, prompt, max_new_tokens=40, temperature=0.0)
    assert greedy == generate(model, tok, prompt, max_new_tokens=40, temperature=0.0, seed=99)
    # The context (EOS + prompt + 40 new) outgrows max_seq_len=32: the window is cropped, not an error.
    ids = [tok.eos_id] + tok.encode(prompt)
    new = generate_ids(model, ids, 40, temperature=0.0)  # no eos_id: exactly 40 tokens
    assert len(new) == 40 and len(ids) + len(new) > TINY["max_seq_len"]
    # Greedy = argmax of a fresh forward at every step (no cache to go stale).
    ctx = list(ids)
    for t in new[:5]:
        assert t == int(model(torch.tensor([ctx[-TINY["max_seq_len"]:]]))[0, -1].argmax())
        ctx.append(t)
    # top_k=1 and a tiny top_p are greedy too, whatever the temperature and seed.
    assert generate_ids(model, ids, 10, temperature=1.5, top_k=1, seed=3) == new[:10]
    assert generate_ids(model, ids, 10, temperature=1.5, top_p=1e-6, seed=4) == new[:10]
    # Sampling: the seed decides; the same seed gives the same text.
    a = generate(model, tok, prompt, max_new_tokens=20, temperature=1.0, seed=1)
    assert a == generate(model, tok, prompt, max_new_tokens=20, temperature=1.0, seed=1)
    samples = {generate(model, tok, prompt, max_new_tokens=20, temperature=1.0, seed=s) for s in range(4)}
    assert len(samples) > 1
    assert generate(model, tok, prompt, max_new_tokens=0) == ""


def test_next_token_filters() -> None:
    from slam_pretrain.downstream.generate import next_token

    logits = torch.tensor([0.4, 0.3, 0.05, 0.15, 0.1]).log()  # softmax gives these back
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, 1.0, 2, 1.0, g) for _ in range(300)} == {0, 1}  # top-2, both
    # top_p=0.8: 0.4 + 0.3 = 0.7 < 0.8, so token 3 (0.15) is still needed; 4 and 2 are not.
    assert {next_token(logits, 1.0, 0, 0.8, g) for _ in range(400)} == {0, 1, 3}
    assert {next_token(logits, 1.0, 0, 0.65, g) for _ in range(300)} == {0, 1}
    assert next_token(logits, 0.0, 0, 1.0, None) == 0
    # A high temperature flattens the distribution: the rare tokens show up.
    assert 2 in {next_token(logits, 5.0, 0, 1.0, g) for _ in range(300)}


def test_cli_user_errors_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    cases = [
        ("generate", "--checkpoint", str(missing), "--input", "hi"),
        ("generate", "--checkpoint", str(tmp_path), "--input", "hi"),  # a dir without a checkpoint
        ("generate", "--checkpoint", str(missing), "--input", "hi", "--top-p", "0"),
        ("export", "--checkpoint", str(missing), "--out", str(tmp_path / "m.safetensors")),
        ("export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.bin")),
    ]
    for i, args in enumerate(cases):
        r = _cli(*args)
        if i == 0:
            assert "does not exist" in r.stderr
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"slam-pretrain {args[0]}: error: "), (args, r.stderr)
        assert "Traceback" not in r.stderr
    bad = tmp_path / "fake.safetensors"
    bad.write_bytes(b"not a safetensors file")
    r = _cli("generate", "--checkpoint", str(bad), "--input", "hi")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------------------------------------
# A real checkpoint: the engine trains two steps and the CheckpointManager writes step_00000002.

@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory, tokenizer_path: Path) -> tuple[Path, Path]:
    """(run out_dir, probe file: tokens and the training process's logits) from a real DeepSpeed
    ZeRO-1 fp32 run of 2 steps (world 1)."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = run_config(root / "run", TINY["max_seq_len"], **TINY)
    probe = root / "probe.pt"
    make_checkpoints(tokenizer_path, [cfg], probes=[probe])
    return Path(cfg.run.out_dir), probe


def test_export_round_trip(checkpoint_run: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    from slam_pretrain.downstream.export import export_checkpoint, export_paths, load_model

    out_dir, probe = checkpoint_run
    ref = torch.load(probe)
    step_dir = out_dir / "checkpoints" / "step_00000002"
    assert step_dir.is_dir() and (out_dir / "checkpoints" / "latest").read_text().strip() == step_dir.name

    out = tmp_path / "exp" / "tiny.safetensors"
    assert export_checkpoint(out_dir, out) == out  # a run out_dir: its latest checkpoint
    weights, config_yaml, tok = export_paths(out)
    assert config_yaml.name == "tiny.config.yaml" and tok.name == "tiny.tokenizer.model"
    assert config_yaml.is_file() and tok.read_bytes() == (step_dir / "tokenizer.model").read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert "lm_head.weight" not in keys and "tok_emb.weight" in keys  # tied: stored once
    assert json.loads(meta["model_config"]) == dataclasses.asdict(ModelConfig(**TINY))
    assert meta["step"] == "2"

    logits = {}
    for name, path in (("step_dir", step_dir), ("out_dir", out_dir), ("export", out)):
        model, tokenizer, info = load_model(path)
        assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
        assert model.lm_head.weight is model.tok_emb.weight  # re-tied on load
        assert info["step"] == 2 and tokenizer.vocab_size == TINY["vocab_size"]
        with torch.no_grad():
            logits[name] = model(ref["tokens"])
    for name, value in logits.items():
        torch.testing.assert_close(value, ref["logits"], rtol=0, atol=1e-6, msg=f"{name} logits differ")
    assert torch.equal(logits["export"], logits["step_dir"])

    # Greedy generation through the CLI: deterministic, and the export writes what the checkpoint writes.
    texts = []
    for src in (out, out, step_dir):
        r = _cli("generate", "--checkpoint", str(src), "--input", "def main(", "--max-new-tokens", "12",
                 "--temperature", "0")
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith("def main(")
        texts.append(r.stdout)
    assert texts[0] == texts[1] == texts[2]
    # The recompute path (--no-cache) writes the same text as the KV cache.
    r = _cli("generate", "--checkpoint", str(out), "--input", "def main(", "--max-new-tokens", "12",
             "--temperature", "0", "--no-cache")
    assert r.returncode == 0 and r.stdout == texts[0], r.stderr[-3000:]
    assert "recompute" in r.stderr and "KV cache" in _cli("generate", "--checkpoint", str(out), "--input", "x",
                                                          "--max-new-tokens", "1").stderr


def test_layout_revision_1_checkpoint_is_refused(checkpoint_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A checkpoint from before layout revision 2 (no layout_revision in its config) would compute
    another function: export and generate refuse it in one line instead of changing it silently."""
    import shutil

    import yaml

    out_dir, _ = checkpoint_run
    old = tmp_path / "step_00000002"
    shutil.copytree(out_dir / "checkpoints" / "step_00000002", old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    assert cfg["model"].pop("layout_revision") == 2  # what a revision-2 checkpoint records
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (old / "files.json").unlink()  # revision-1 checkpoints predate files.json (else: a damaged config.yaml)
    for args in (("generate", "--checkpoint", str(old), "--input", "hi"),
                 ("export", "--checkpoint", str(old), "--out", str(tmp_path / "m.safetensors"))):
        r = _cli(*args)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "layout revision 1" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "m.safetensors").exists()
