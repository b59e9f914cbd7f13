"""`prepare`: the shards, the manifest, the tokenizer, idempotency, atomicity and the CLI."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_assets import build_tiny_dataset, shared_tiny_dataset, tiny_data_config
from data_pipeline import DataError, Tokenizer, check_compatible, load_manifest
from data_pipeline.prepare import prepare_from_config
from data_pipeline.sources import resolve_sources

REPO = Path(__file__).resolve().parents[1]
EOS, PAD = 3, 0


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return shared_tiny_dataset(tmp_path_factory)


def split_rows(manifest: Path, split: str) -> list[np.ndarray]:
    """A split's rows in order, read with the plain webdataset pipeline."""
    m = load_manifest(manifest)
    urls = [s.location for s in m.splits[split].shards]
    return [s["tokens.npy"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()]


def split_documents(manifest: Path, split: str, tok: Tokenizer) -> list[str]:
    """Undo the packing (rows overlap by one token), cut at EOS and decode each document."""
    rows = split_rows(manifest, split)
    stream = np.concatenate([rows[0]] + [r[1:] for r in rows[1:]]).astype(np.int64)
    stream = stream[stream != PAD]  # only the last row's tail is padding
    cuts = np.nonzero(stream == EOS)[0]
    assert cuts.size and cuts[-1] == stream.size - 1, "every document must end with EOS"
    docs, start = [], 0
    for c in cuts.tolist():
        docs.append(tok.decode(stream[start:c].tolist()))
        start = c + 1
    return docs


def test_manifest_describes_the_shards(tiny):
    raw = json.loads(tiny.read_text())
    m = load_manifest(tiny)
    assert (m.vocab_size, m.seq_len, m.dtype) == (2048, 128, "uint16")
    assert m.tokenizer_sha256 == hashlib.sha256((tiny.parent / "tokenizer.model").read_bytes()).hexdigest()
    assert set(m.splits) == {"train", "val"} and m.splits["val"].rows > 0
    assert len(m.splits["train"].shards) > 3
    for s in m.shards:
        data = Path(s.location).read_bytes()
        assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256
        assert sum(1 for _ in wds.WebDataset(s.location, shardshuffle=False)) == s.rows
    assert raw["totals"]["rows"] == sum(sp.rows for sp in m.splits.values())
    assert raw["totals"]["shards"] == len(m.shards)
    assert raw["totals"]["bytes"] == sum(s.bytes for s in m.shards)
    assert raw["sources"][0]["kind"] == "stdlib" and raw["sources"][0]["documents"] > 10
    assert raw["build"]["fingerprint"] and raw["version"] == 1


def test_shards_are_plain_webdataset_and_round_trip_to_the_source_text(tiny):
    m = load_manifest(tiny)
    tok = m.load_tokenizer()
    rows = split_rows(tiny, "train")
    assert len(rows) == m.splits["train"].rows and rows[0].dtype == np.uint16 and rows[0].shape == (129,)
    train, val = split_documents(tiny, "train", tok), split_documents(tiny, "val", tok)
    n_docs = json.loads(tiny.read_text())["sources"][0]["documents"]
    source = list(resolve_sources(["stdlib"])[0].documents())[:n_docs]
    assert Counter(train + val) == Counter(source)  # nothing lost, nothing invented, lossless
    it = iter(source)
    assert all(any(d == s for s in it) for d in train)  # train documents keep the source order


def test_tokenizer_is_lossless_with_fixed_special_ids(tiny):
    tok = load_manifest(tiny).load_tokenizer()
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 3, 2048)
    text = "def f(x):\n\treturn  x  # naïve → ∑ 数据 🙂\r\n\n   trailing   \x00\x07"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert Tokenizer(tiny.parent / "tokenizer.model").encode(text) == ids


def test_check_compatible_names_the_mismatch(tiny):
    assert check_compatible(tiny, 2048, 128).seq_len == 128
    with pytest.raises(DataError, match="vocab_size=2048 but model.vocab_size=4096"):
        check_compatible(tiny, 4096, 128)
    with pytest.raises(DataError, match="seq_len=128 but data.seq_len=256"):
        check_compatible(tiny, 2048, 256)
    with pytest.raises(DataError, match="tokenizer sha256"):
        check_compatible(tiny, 2048, 128, tokenizer_sha256="ab" * 32)


def test_rerun_is_a_no_op_and_other_inputs_are_refused(tiny, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in tiny.parent.iterdir()}
    assert build_tiny_dataset(tiny.parent) == tiny
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in tiny.parent.iterdir()} == before
    with pytest.raises(DataError, match=r"other inputs \(seq_len: 128 -> 64\)"):
        build_tiny_dataset(tiny.parent, seq_len=64)


def test_a_killed_build_leaves_no_manifest_and_no_half_shard(tmp_path):
    out = tmp_path / "ds"
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); from data_assets import build_tiny_dataset; "
              f"build_tiny_dataset({str(out)!r}, corpus_mb=4.0, shard_size_mb=0.02)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("train-*.tar")):
        assert proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    visible = sorted(out.glob("*.tar"))
    assert visible, "the kill came before any shard was written"
    for shard in visible:  # every shard under a final name is complete
        assert shard.stat().st_size % 10240 == 0
        with tarfile.open(shard) as tf:
            members = tf.getmembers()
            assert members and all(tf.extractfile(x).read().__len__() == x.size for x in members)
    manifest = build_tiny_dataset(out, corpus_mb=4.0, shard_size_mb=0.02)
    assert manifest.exists() and not list(out.glob("*.tmp*"))
    assert all(Path(s.location).exists() for s in load_manifest(manifest).shards)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("slam-pretrain")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_prepare_logs_builds_and_reruns(tmp_path):
    out = tmp_path / "cli_ds"
    args = ["prepare", "--config", str(REPO / "configs/tiny_cpu.yaml"), "--set", f"data.dataset_dir={out}",
            "--set", "data.max_corpus_mb=0.5", "--set", "data.tokenizer_sample_mb=0.2", "--set", "model.vocab_size=1024"]
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "[prepare] encode" in first.stderr  # not a terminal: plain log lines, no bars
    assert "[prepare] done in" in first.stdout and "tokens" in first.stdout
    assert load_manifest(out / "manifest.json").vocab_size == 1024
    again = _cli(*args, cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout
    bad = _cli("prepare", "--config", str(REPO / "configs/tiny_cpu.yaml"), "--set", f"data.dataset_dir={tmp_path / 'x'}",
               "--set", "data.sources=[{path: /no/such/corpus}]", cwd=tmp_path)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "/no/such/corpus" in lines[0] and "does not exist" in lines[0]


def test_unigram_tokenizer_and_small_corpus_val_fallback(tmp_path):
    """Unigram works too; a corpus too small to hold out a document still gets a val split."""
    manifest = prepare_from_config(tiny_data_config(tmp_path / "u", seq_len=32, corpus_mb=0.05, tokenizer_type="unigram",
                                                    val_fraction=0.01), 400, quiet=True)
    m = load_manifest(manifest)
    assert m.raw["tokenizer"]["model_type"] == "unigram"
    assert m.splits["val"].documents == 0 and m.splits["val"].rows >= 1  # rows moved from train
    assert m.splits["train"].rows >= 1


def test_output_does_not_depend_on_encoder_parallelism(tmp_path):
    """2 forked processes x 1 thread write byte-identical shards to 1 process x 2 threads."""
    ids = []
    for procs, threads in ((2, 1), (1, 2)):
        cfg = tiny_data_config(tmp_path / f"p{procs}", seq_len=64, corpus_mb=0.3, encode_procs=procs,
                               encode_threads=threads)
        ids.append(load_manifest(prepare_from_config(cfg, 512, quiet=True)).dataset_id)
    assert ids[0] == ids[1]


def test_progress_bars_on_a_terminal_and_lines_otherwise():
    import io

    from data_pipeline.progress import Reporter

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        rep = Reporter(stream=stream, interval=0.0)
        with rep.bar("encode", total=4e6) as bar:
            bar.update(1e6)
            bar.update(3e6)
    assert "\r" in tty.getvalue() and "100%|" in tty.getvalue() and "MB/s" in tty.getvalue()
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and lines[-1].startswith("[prepare] encode: 4.0/4.0 MB (100%)")
    assert "eta" in lines[0]
