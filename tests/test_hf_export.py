"""Hugging Face export (`slam-pretrain export --format hf`): real checkpoints of the modern and the
reference preset are exported through the CLI and loaded with transformers' Auto classes
(remote code); the HF model's logits equal ours (fp32, 1e-5), greedy `generate` with its KV cache
equals `generate_ids(temperature=0)` and the HF model without the cache, padded batches give each
row's own result, and `AutoTokenizer` gives our ids on code, prose and non-ASCII text (BPE as a
fast tokenizer.json, unigram through the shipped SentencePiece class). Offline: transformers'
module cache and home are temporary folders.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

# transformers reads these when imported: keep its caches out of the user's home, never go online.
_HF_TMP = tempfile.mkdtemp(prefix="slam-hf-test-")
atexit.register(shutil.rmtree, _HF_TMP, ignore_errors=True)
os.environ["HF_HOME"] = os.path.join(_HF_TMP, "home")
os.environ["HF_MODULES_CACHE"] = os.path.join(_HF_TMP, "modules")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_assets import REPO, make_checkpoints, run_config, train_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers", reason="the 'hf' extra (make test installs it)")

VOCAB = 400
MODERN = dict(vocab_size=VOCAB, max_seq_len=96, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, ef_cycles=2,
              segment_len=12, overlap=3, init_std=0.3)  # a large init: varied greedy text
REFERENCE = dict(vocab_size=VOCAB, max_seq_len=48, d_model=32, num_heads=4, d_ff=64, ef_cycles=3,
                 segment_len=0.6, overlap=0.2, norm="layernorm", norm_position="post", ffn="gelu",
                 pos_encoding="learned", tie_embeddings=False, init_std=0.3)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "slam_pretrain", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{preset: (run out_dir, hf export dir)}: real checkpoints exported through the CLI."""
    root = tmp_path_factory.mktemp("hf")
    tok = train_tokenizer(root / "tokenizer.model", VOCAB)
    runs = {"modern": (root / "modern", MODERN), "reference": (root / "reference", REFERENCE)}
    make_checkpoints(tok, [run_config(out, m["max_seq_len"], **m) for out, m in runs.values()])
    from slam_pretrain.downstream.hf_export import export_hf

    result = {name: (out, root / f"{name}-hf") for name, (out, _) in runs.items()}
    run, hf_dir = result["modern"]  # through the CLI; the other in-process (saves a transformers import)
    r = _cli("export", "--checkpoint", str(run), "--format", "hf", "--out", str(hf_dir))
    assert r.returncode == 0 and str(hf_dir) in r.stdout, r.stderr[-3000:]
    run, hf_dir = result["reference"]
    assert export_hf(run / "checkpoints" / "step_00000002", hf_dir) == hf_dir
    return result


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)


def test_export_folder_layout(exports) -> None:
    from slam_pretrain.downstream.hf_export import is_hf_export

    for name, (_, hf_dir) in exports.items():
        files = {p.name for p in hf_dir.iterdir()}
        assert {"config.json", "configuration_slam.py", "modeling_slam.py", "model.safetensors",
                "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "slam_pretrain.json"} <= files, files
        cfg = json.loads((hf_dir / "config.json").read_text())
        assert cfg["model_type"] == "slam" and cfg["architectures"] == ["SLAMForCausalLM"]
        assert cfg["auto_map"] == {"AutoConfig": "configuration_slam.SLAMConfig",
                                   "AutoModelForCausalLM": "modeling_slam.SLAMForCausalLM"}
        assert cfg["use_cache"] is (name == "modern")  # fractional layouts: no exact cache
        for py in ("configuration_slam.py", "modeling_slam.py"):
            assert not re.search(r"^\s*(from|import)\s+(slam_pretrain|data_pipeline)", (hf_dir / py).read_text(), re.M)
        assert is_hf_export(hf_dir) and json.loads((hf_dir / "slam_pretrain.json").read_text())["step"] == 2
        assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("preset", ["modern", "reference"])
def test_hf_logits_equal_ours(exports, preset: str) -> None:
    from slam_pretrain.downstream.export import load_model

    run, hf_dir = exports[preset]
    ours, _, _ = load_model(run)
    hf = _hf_model(hf_dir)
    assert not hf.training and all(p.dtype == torch.float32 for p in hf.parameters())
    if preset == "modern":
        assert hf.lm_head.weight is hf.tok_emb.weight  # tied, stored once
    else:
        assert not torch.equal(hf.lm_head.weight, hf.tok_emb.weight)
    n = ours.config.max_seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, VOCAB, (3, n), generator=g)
    with torch.no_grad():
        for length in (n, n // 2 + 1, 7):
            torch.testing.assert_close(hf(x[:, :length]).logits, ours(x[:, :length]), rtol=0, atol=1e-5)
        # A padded batch (left and right): each row as if it were alone.
        lengths, mask = [n - 5, n - 17, 9], torch.zeros(3, n, dtype=torch.long)
        mask[0, 5:], mask[1, :n - 17], mask[2, 20:29] = 1, 1, 1
        logits = hf(x, attention_mask=mask).logits
        for r in range(3):
            cols = mask[r].nonzero().flatten()
            row = x[r, cols][None]
            torch.testing.assert_close(logits[r, cols], ours(row)[0], rtol=0, atol=1e-5)
            assert lengths[r] == len(cols) and torch.all(logits[r, mask[r] == 0] == 0)


def test_hf_cache_matches_full_forward_and_our_generate(exports) -> None:
    from slam_pretrain.downstream.export import load_model
    from slam_pretrain.downstream.generate import generate_batch, generate_ids
    from slam_pretrain.model.kv_cache import decode_step, prefill

    run, hf_dir = exports["modern"]
    ours, _, _ = load_model(run)
    hf = _hf_model(hf_dir)
    n = ours.config.max_seq_len  # 96 with S=12, O=3: prompts and continuations cross many segments
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, VOCAB, (2, n), generator=g)
    with torch.no_grad():
        full = ours(x)
        out = hf(x[:, :5], use_cache=True)  # prefill, then one token at a time through the cache
        cache, steps = out.past_key_values, [out.logits]
        for t in range(5, n):
            out = hf(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        hf_steps = torch.cat(steps, dim=1)
        # Our own KV cache, step by step: the HF cache computes the very same thing.
        _, our_cache = prefill(ours, x[:, :5].tolist(), n)
        our_steps = torch.stack([decode_step(ours, our_cache, x[:, t]) for t in range(5, n)], dim=1)
        torch.testing.assert_close(hf_steps[:, 5:], our_steps, rtol=0, atol=1e-6)
        torch.testing.assert_close(hf_steps[:, :5], full[:, :5], rtol=0, atol=1e-5)
        # Against the full forward: fp32 rounding of another summation order (logits up to ~8 here;
        # tests/test_kv_cache.py pins 1e-5 at the default init scale).
        torch.testing.assert_close(hf_steps, full, rtol=0, atol=1e-4)
        assert cache.get_seq_length() == n and all(k.shape[2] == 12 for cyc in cache.ef for k, _ in cyc)

    for prompt in (x[0, :23].tolist(), [3]):
        new = 45  # across several segments (stride 9)
        ref = generate_ids(ours, prompt, new, temperature=0, notify=None)
        assert len(set(ref)) > 5, ref  # a varied continuation, not one token repeated
        ids = torch.tensor([prompt])
        cached = hf.generate(ids, max_new_tokens=new, do_sample=False)[0, len(prompt):].tolist()
        recomputed = hf.generate(ids, max_new_tokens=new, do_sample=False, use_cache=False)[0, len(prompt):].tolist()
        assert cached == ref == recomputed
    # A left-padded batch of prompts of different lengths (the tokenizer pads on the left).
    prompts = [[3, 5, 77, 120, 9, 31, 200], [3, 250]]
    ref = generate_batch(ours, prompts, 30, temperature=0, notify=None)
    ids = torch.tensor([prompts[0], [0] * 5 + prompts[1]])
    mask = (torch.arange(7)[None] >= torch.tensor([[0], [5]])).long()
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert got[:, 7:].tolist() == ref
    # Beam search reorders the cache: same beams as without it.
    beams = [hf.generate(torch.tensor([prompts[0]]), max_new_tokens=12, num_beams=3, do_sample=False,
                         use_cache=c)[0].tolist() for c in (True, False)]
    assert beams[0] == beams[1]


def test_reference_preset_generates_without_cache(exports) -> None:
    from slam_pretrain.downstream.export import load_model
    from slam_pretrain.downstream.generate import generate_ids

    run, hf_dir = exports["reference"]
    ours, _, _ = load_model(run)
    hf = _hf_model(hf_dir)
    prompt = [3, 17, 42, 99]
    ref = generate_ids(ours, prompt, 30, temperature=0, notify=None)  # the recompute path
    assert len(set(ref)) > 5
    for use_cache in (None, True, False):  # a cache is never built for a fractional layout
        kw = {} if use_cache is None else {"use_cache": use_cache}
        got = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, **kw)
        assert got[0, len(prompt):].tolist() == ref


def test_cli_generate_text_equals_hf(exports) -> None:
    """`slam-pretrain generate --temperature 0` writes what the HF model and tokenizer write."""
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import Tokenizer

    run, hf_dir = exports["modern"]
    r = _cli("generate", "--checkpoint", str(run), "--input", "def main(", "--max-new-tokens", "20",
             "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    ids = [tok.eos_token_id] + tok("def main(")["input_ids"]  # training documents start after EOS
    out = _hf_model(hf_dir).generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                     eos_token_id=tok.eos_token_id)
    # Text from the ids as `generate` makes it (decode prompt + continuation, cut the prompt): this
    # barely trained model writes byte pieces that are not valid UTF-8, which SentencePiece and the
    # tokenizers library render differently (see the README), so the ids are decoded by ours.
    ours = Tokenizer(run / "checkpoints" / "step_00000002" / "tokenizer.model")
    new = [t for t in out[0, len(ids):].tolist() if t != tok.eos_token_id]
    assert ids == [3] + ours.encode("def main(")
    text = ours.decode(ids + new)[len(ours.decode(ids)):]
    assert "def main(" + text == r.stdout.rstrip("\n")


def _texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text()[:40_000] for name in ("json/encoder.py", "typing.py", "os.py")]
    from pydoc_data.topics import topics  # prose

    texts += [topics[k] for k in ("assignment", "class", "exceptions")]
    texts += ["", " ", "   leading", "trailing   ", "\n\n\n", "tab\there", "x\r\ny", "naïve façade — Ünïcödé",
              "日本語のテキスト、中文字符。", "Ελληνικά και русский текст", "emoji 🎉🚀 and ＡＢＣ full-width ﬁ",
              "\u00a0nbsp\u200bzero-width", "</s> <s> <pad> <unk> in text", "1234567890 3.14159 -0.5e-10",
              "\x00\x01\x7f control", "a" * 300, " " * 40 + "indent"]
    return texts


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_ids_equal_ours(tmp_path: Path, model_type: str) -> None:
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import Tokenizer
    from slam_pretrain.downstream.hf_export import write_tokenizer

    ours = Tokenizer(train_tokenizer(tmp_path / "sp.model", 500, model_type))
    out = tmp_path / "tok"
    out.mkdir()
    kind = write_tokenizer(ours, out, 128)
    assert kind == ("fast" if model_type == "bpe" else "sentencepiece")
    hf = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    assert hf.is_fast is (model_type == "bpe")
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert hf.padding_side == "left"
    for text in _texts():
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text[:60]  # no BOS/EOS added, like ours
        assert hf.decode(ids) == ours.decode(ids) == text, text[:60]
    ids = [3] + ours.encode("x = 1\n") + [0, 2]
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids) == "x = 1\n"  # ours drops them
    assert hf.decode(ids) == "</s>x = 1\n<pad><s>"  # transformers' convention: written out


def test_export_dir_rules(exports, tmp_path: Path) -> None:
    """A previous export is replaced; a foreign non-empty folder or a file is one line, exit 2."""
    from slam_pretrain.downstream.hf_export import export_hf
    from slam_pretrain.errors import UserError

    run, hf_dir = exports["modern"]
    again = tmp_path / "again"
    shutil.copytree(hf_dir, again)
    (again / "stale.txt").write_text("from an older export")
    export_hf(run, again)
    assert not (again / "stale.txt").exists() and (again / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(run, empty)
    assert (empty / "config.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    file_out = tmp_path / "file"
    file_out.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        export_hf(run, file_out)
    r = _cli("export", "--checkpoint", str(run), "--format", "hf", "--out", str(foreign))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "not empty" in lines[0], r.stderr
    assert lines[0].startswith("slam-pretrain export: error: ")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and file_out.read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
