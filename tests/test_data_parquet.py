"""Parquet and Hugging Face dataset sources, existing tokenizers (SentencePiece .model, Hugging Face
tokenizer.json): round trips, filters, mixing, and one-line errors naming the file and row group.

Everything is built here, offline: Parquet files with pyarrow, Hugging Face datasets with
``save_to_disk`` and a folder of JSONL read by ``load_dataset`` (streaming), a byte-level BPE
tokenizer.json trained with the ``tokenizers`` library on a few stdlib files.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import random
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_assets import tiny_data_config
from data_pipeline import DataError, load_manifest
from data_pipeline.loader import build_loader
from data_pipeline.prepare import prepare_from_config
from data_pipeline.sources import resolve_sources
from data_pipeline.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 400


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "vo", "ze", "qua", "bel", "dor", " ", "\n", "."]
    return "".join(rng.choice(syll) for _ in range(n))


def write_parquet_corpus(folder: Path, files: int = 3, rows: int = 40, row_group_size: int = 7) -> list[dict]:
    """``files`` Parquet files of ``rows`` rows (text, lang, score); some texts null or empty.
    Returns every row in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in range(files):
        recs = []
        for r in range(rows):
            k = f * rows + r
            text = None if k % 17 == 5 else ("" if k % 19 == 7 else f"doc {k}: " + words(k, 60 + k % 50))
            recs.append({"text": text, "lang": "en" if k % 3 else "de", "score": (k % 10) / 10})
        pq.write_table(pa.Table.from_pylist(recs), folder / f"part-{f:02d}.parquet", row_group_size=row_group_size,
                       compression="zstd")
        out += recs
    return out


def build(tmp_path: Path, name: str, sources: list, vocab: int = VOCAB, **kw) -> Path:
    cfg = tiny_data_config(tmp_path / name, seq_len=kw.pop("seq_len", 32), sources=sources, corpus_mb=None,
                           shard_size_mb=0.02, **kw)
    return prepare_from_config(cfg, vocab, quiet=True)


def documents(manifest: Path, split: str) -> list[str]:
    """Undo the packing of a split (rows overlap by one token; a padded or dropped tail) and decode
    each EOS-terminated document."""
    m = load_manifest(manifest)
    tok = m.load_tokenizer()
    rows = [np.frombuffer(Path(s.location).read_bytes(), np.uint8) for s in m.splits[split].shards]
    fmt = m.row_format
    data = [r[: s.rows * fmt.record_bytes].reshape(s.rows, fmt.record_bytes) for r, s in zip(rows, m.splits[split].shards)]
    toks = np.concatenate([d[:, fmt.data_offset:fmt.data_offset + fmt.data_bytes].view(fmt.np_dtype) for d in data])
    stream = np.concatenate([toks[0]] + [r[1:] for r in toks[1:]]).astype(np.int64)
    pad = m.tokenizer["pad_id"]
    if pad is not None:
        stream = stream[stream != pad]
    eos = m.tokenizer["eos_id"]
    cuts = np.nonzero(stream == eos)[0]
    docs, start = [], 0
    for c in cuts.tolist():
        docs.append(tok.decode(stream[start:c].tolist()))
        start = c + 1
    return docs


def all_documents(manifest: Path) -> Counter:
    return Counter(documents(manifest, "train") + documents(manifest, "val"))


# ---------------------------------------------------------------------------------------------
# Parquet


def test_parquet_folder_by_row_group_with_filters_round_trips(tmp_path):
    rows = write_parquet_corpus(tmp_path / "pq")
    src = resolve_sources([{"path": str(tmp_path / "pq")}])[0]
    units = src.units()
    assert len(units) == 3 * 6 and units[1].key.endswith("part-00.parquet row group 1")  # 40 rows / 7 per group
    texts = [r["text"] for r in rows if r["text"]]
    assert list(src.documents()) == texts  # file order, row order; null and empty skipped
    manifest = build(tmp_path, "all", [{"path": str(tmp_path / "pq")}])
    assert all_documents(manifest) == Counter(texts)  # lossless, nothing lost or invented

    filters = [["lang", "==", "en"], ["score", ">=", 0.5]]
    kept = [r["text"] for r in rows if r["text"] and r["lang"] == "en" and r["score"] >= 0.5]
    src = resolve_sources([{"path": str(tmp_path / "pq" / "*.parquet"), "filters": filters}])[0]
    assert list(src.documents()) == kept
    m = load_manifest(build(tmp_path, "filtered", [{"path": str(tmp_path / "pq"), "filters": filters}]))
    assert m.sources[0]["filters"] == filters and m.sources[0]["documents"] == len(kept)
    assert all_documents(m.location) == Counter(kept)
    src = resolve_sources([{"path": str(tmp_path / "pq"), "filters": [["lang", "in", ["de"]], ["score", "not in", [0.0]]]}])[0]
    assert list(src.documents()) == [r["text"] for r in rows if r["text"] and r["lang"] == "de" and r["score"] != 0.0]


def test_parquet_mixed_with_jsonl_by_weight_is_reproducible(tmp_path):
    write_parquet_corpus(tmp_path / "pq", files=2)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text("".join(json.dumps({"text": words(900 + i, 300)}) + "\n" for i in range(30)))
    sources = [{"path": str(tmp_path / "pq"), "weight": 1.0}, {"path": str(tmp_path / "j"), "weight": 3.0}]
    m1 = load_manifest(build(tmp_path, "m1", sources, seed=5))
    a, b = m1.sources
    share = b["written_text_bytes"] / (a["written_text_bytes"] + b["written_text_bytes"])
    assert abs(share - 0.75) < 0.1
    assert load_manifest(build(tmp_path, "m2", sources, seed=5)).dataset_id == m1.dataset_id


def _one_line_error(tmp_path, name, sources, *needles, **kw) -> str:
    with pytest.raises(DataError) as e:
        build(tmp_path, name, sources, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert not (tmp_path / name / "manifest.json").exists()
    return msg


def test_bad_parquet_inputs_are_one_line_naming_file_and_row_group(tmp_path):
    write_parquet_corpus(tmp_path / "pq", files=1, rows=30, row_group_size=10)
    good = tmp_path / "pq" / "part-00.parquet"
    # Not Parquet at all.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.parquet").write_bytes(b"PAR1 this is not parquet" * 10)
    _one_line_error(tmp_path, "e1", [{"path": str(tmp_path / "junk")}], "data.sources[0]", "x.parquet",
                    "not a readable Parquet file")
    # A missing text column / filter column.
    _one_line_error(tmp_path, "e2", [{"path": str(good), "text_field": "body"}], "part-00.parquet", "no column 'body'",
                    "columns: text, lang, score")
    _one_line_error(tmp_path, "e3", [{"path": str(good), "filters": [["source", "==", "web"]]}], "no column 'source'",
                    "filter column")
    # A filter that cannot compare (a string column against a number).
    _one_line_error(tmp_path, "e4", [{"path": str(good), "filters": [["lang", ">", 3]]}], "part-00.parquet row group 0",
                    "data.sources[0]", "filter [lang, >, 3]")
    # A text column that is not text.
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    _one_line_error(tmp_path, "e5", [{"path": str(tmp_path / "ints.parquet")}], "data.sources[0]",
                    "ints.parquet row group 0", "holds int64, not text")
    # One damaged row group: the error names it; the row groups before it were read.
    md = pq.ParquetFile(good).metadata.row_group(1).column(0)
    start = md.dictionary_page_offset or md.data_page_offset
    raw = bytearray(good.read_bytes())
    raw[start:start + md.total_compressed_size] = b"\x55" * md.total_compressed_size
    bad = tmp_path / "damaged.parquet"
    bad.write_bytes(bytes(raw))
    _one_line_error(tmp_path, "e6", [{"path": str(bad)}], "data.sources[0]", "damaged.parquet row group 1: unreadable")
    # Filters on a source that is not Parquet.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("text")
    _one_line_error(tmp_path, "e7", [{"path": str(tmp_path / "t"), "filters": [["a", "==", 1]]}], "only Parquet")


def test_config_validation_of_new_source_keys():
    from data_pipeline.config import DataConfig, DataConfigError

    for bad, needle in [({"path": "x", "filters": [["a", "~", 1]]}, "filters[0]"),
                        ({"path": "x", "filters": [["a", "in", 3]]}, "non-empty list value"),
                        ({"hf": "x", "split": 3}, "sources[0].split"),
                        ({"hf": "x", "streaming": "yes"}, "streaming"),
                        ({"hf": "x", "path": "y"}, "'path' key (files) or an 'hf' key"),
                        ({"path": "x", "split": "train"}, "unknown keys ['split']")]:
        with pytest.raises(DataConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            DataConfig(sources=[bad]).validate()
    DataConfig(sources=[{"hf": "org/name", "subset": "en", "split": "train[:10%]", "streaming": False,
                         "filters": [["lang", "in", ["en", "fr"]]]}], tokenizer="t.json").validate()


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def test_hf_dataset_saved_to_disk_and_a_local_folder_streamed(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    texts = [f"record {i}: " + words(100 + i, 80 + i % 40) for i in range(50)]
    labels = ["keep" if i % 4 else "drop" for i in range(50)]
    ds = datasets.Dataset.from_dict({"content": texts + ["", None], "label": labels + ["keep", "keep"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "folder").mkdir()
    for f in range(3):  # three files: a streaming dataset of three shards
        (tmp_path / "folder" / f"f{f}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts[f * 10:(f + 1) * 10]))

    src = resolve_sources([{"hf": str(tmp_path / "saved"), "text_field": "content",
                            "filters": [["label", "==", "keep"]]}])[0]
    kept = [t for t, lab in zip(texts, labels) if lab == "keep"]
    assert list(src.documents()) == kept
    streamed = resolve_sources([{"hf": str(tmp_path / "folder")}])[0]
    assert [u.key.rsplit(" ", 3)[-3:] for u in streamed.units()] == [["0", "of", "3"], ["1", "of", "3"], ["2", "of", "3"]]
    assert list(streamed.documents()) == texts[:30]
    dd = resolve_sources([{"hf": str(tmp_path / "dd"), "split": "validation", "text_field": "content"}])[0]
    assert list(dd.documents()) == texts[:5]

    sources = [{"hf": str(tmp_path / "saved"), "text_field": "content", "filters": [["label", "==", "keep"]]},
               {"hf": str(tmp_path / "folder"), "weight": 0.5}]
    manifest = build(tmp_path, "hf", sources)
    m = load_manifest(manifest)
    assert [s["kind"] for s in m.sources] == ["hf", "hf"] and m.sources[0]["documents"] == len(kept)
    got = all_documents(manifest)
    assert set(got) <= set(kept) | set(texts[:30]) and set(kept) <= set(got)
    assert build(tmp_path, "hf", sources) == manifest  # up to date

    _one_line_error(tmp_path, "e1", [{"hf": str(tmp_path / "saved")}], "data.sources[0]", "no column 'text'",
                    "columns: content, label")
    _one_line_error(tmp_path, "e2", [{"hf": str(tmp_path / "dd"), "split": "test"}], "has no split 'test'",
                    "train, validation")
    _one_line_error(tmp_path, "e3", [{"hf": "no-such-org/no-such-dataset"}], "data.sources[0]",
                    "cannot load Hugging Face dataset 'no-such-org/no-such-dataset'")


# ---------------------------------------------------------------------------------------------
# Existing tokenizers


def train_hf_tokenizer(path: Path, vocab: int, specials: list[str]) -> Path:
    """A byte-level BPE tokenizer.json trained on a few stdlib files (lossless on any text)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok.train([str(p) for p in sorted((stdlib / "json").glob("*.py"))], trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_json_without_a_pad_token(tmp_path):
    tj = train_hf_tokenizer(tmp_path / "tokenizer.json", 600, ["<|endoftext|>"])
    tok = Tokenizer(tj)
    assert (tok.kind, tok.eos_id, tok.pad_id, tok.vocab_size) == ("hf", 0, -1, 600)
    text = "def f(x):\n\treturn  x  # naïve → ∑ <|endoftext|> 🙂\r\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eos_id not in ids  # special-token text stays text
    rows = write_parquet_corpus(tmp_path / "pq", files=2)
    manifest = build(tmp_path, "ds", [{"path": str(tmp_path / "pq")}], vocab=600, tokenizer=str(tj))
    m = load_manifest(manifest)
    assert m.tokenizer["file"] == "tokenizer.json" and m.tokenizer["kind"] == "hf"
    assert m.tokenizer["pad_id"] is None and m.tokenizer["eos_id"] == 0 and m.tokenizer["source"] == str(tj)
    assert m.tokenizer_sha256 == tok.sha256 and m.raw["packing"]["last_row"].startswith("dropped")
    got = all_documents(manifest)
    texts = Counter(r["text"] for r in rows if r["text"])
    assert got and all(got[t] <= texts[t] for t in got)  # lossless; only the dropped tail is missing
    assert sum(texts.values()) - sum(got.values()) <= 2
    # The loader: nothing is masked (no pad row), and ids stay below the vocabulary.
    ld = build_loader(manifest, rank=0, world_size=1, micro_batch_size=4, seed=0, num_workers=0)
    batches = list(ld)
    assert batches and all(int((b["labels"] == -100).sum()) == 0 for b in batches)
    assert max(int(b["input_ids"].max()) for b in batches) < 600
    # Training code copies the tokenizer as "tokenizer.model": it still loads as the same tokenizer.
    copy = tmp_path / "tokenizer.model"
    copy.write_bytes(tj.read_bytes())
    assert Tokenizer(copy).encode(text) == ids


def test_hf_tokenizer_with_a_pad_token_pads_the_last_row(tmp_path):
    tj = train_hf_tokenizer(tmp_path / "t.json", 500, ["<pad>", "</s>", "<s>", "<unk>"])
    write_parquet_corpus(tmp_path / "pq", files=1)
    m = load_manifest(build(tmp_path, "ds", [{"path": str(tmp_path / "pq")}], vocab=500, tokenizer=str(tj)))
    assert (m.tokenizer["pad_id"], m.tokenizer["eos_id"], m.tokenizer["bos_id"], m.tokenizer["unk_id"]) == (0, 1, 2, 3)
    assert m.raw["packing"]["last_row"].startswith("padded")


def test_existing_sentencepiece_model_and_tokenizer_errors(tmp_path, tiny_manifest):
    sp_model = Path(tiny_manifest).parent / "tokenizer.model"
    write_parquet_corpus(tmp_path / "pq", files=1)
    src = [{"path": str(tmp_path / "pq")}]
    manifest = build(tmp_path, "sp", src, vocab=2048, tokenizer=str(sp_model))
    m = load_manifest(manifest)
    assert m.tokenizer_sha256 == Tokenizer(sp_model).sha256 and m.tokenizer["kind"] == "sentencepiece"
    assert (m.tokenizer["pad_id"], m.tokenizer["eos_id"]) == (0, 3) and "tokenizer_type" not in m.raw["build"]["settings"]
    assert all_documents(manifest) == Counter(r["text"] for r in write_parquet_corpus(tmp_path / "pq", files=1) if r["text"])

    _one_line_error(tmp_path, "v", src, "has 2,048 tokens but model.vocab_size=4096", "set model.vocab_size=2048",
                    vocab=4096, tokenizer=str(sp_model))
    _one_line_error(tmp_path, "m", src, "data.tokenizer='/no/such/tokenizer.json' cannot be read",
                    tokenizer="/no/such/tokenizer.json")
    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    _one_line_error(tmp_path, "b", src, "broken.json", "not a valid Hugging Face tokenizer.json",
                    tokenizer=str(tmp_path / "broken.json"))
    no_eos = train_hf_tokenizer(tmp_path / "noeos.json", 400, ["<pad>"])
    _one_line_error(tmp_path, "n", src, "noeos.json", "has no end-of-text token", "<|endoftext|>",
                    tokenizer=str(no_eos))


def test_cli_prepare_from_parquet_with_a_tokenizer_json(tmp_path):
    tj = train_hf_tokenizer(tmp_path / "tokenizer.json", 520, ["<|endoftext|>", "<pad>"])
    write_parquet_corpus(tmp_path / "pq", files=2)
    exe = Path(sys.executable).with_name("slam-pretrain")
    args = [str(exe), "prepare", "--config", str(REPO / "configs/tiny_cpu.yaml"),
            "--set", f"data.dataset_dir={tmp_path / 'ds'}", "--set", f"data.sources=[{{path: {tmp_path / 'pq'}}}]",
            "--set", f"data.tokenizer={tj}", "--set", "model.vocab_size=520", "--set", "data.seq_len=32"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "tokenizer.json (BPE, vocab 520)" in p.stdout
    bad = subprocess.run(args[:-4] + ["--set", "model.vocab_size=1000"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "has 520 tokens but model.vocab_size=1000" in bad.stderr
