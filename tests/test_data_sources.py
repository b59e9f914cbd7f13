"""Corpus sources: files, folders, globs, JSONL(.gz), bad input, and mixing weights."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from data_assets import tiny_data_config, write_text_corpus
from data_pipeline import DataError, load_manifest
from data_pipeline.prepare import prepare_from_config
from data_pipeline.sources import resolve_sources

VOCAB = 400


def pseudo_words(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "vo", "ze", "qua", "bel", "dor"]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def build(tmp_path: Path, name: str, sources: list, **kw) -> Path:
    cfg = tiny_data_config(tmp_path / name, seq_len=kw.pop("seq_len", 64), sources=sources, corpus_mb=None,
                           shard_size_mb=0.05, **kw)
    return prepare_from_config(cfg, VOCAB, quiet=True)


def test_files_folders_globs_and_jsonl_in_sorted_order(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file")
    (d / "a.txt").write_text("first file")
    (d / "notes.md").write_text("not a corpus file")
    (d / "sub" / "c.jsonl").write_text(json.dumps({"content": "jsonl one"}) + "\n\n" + json.dumps({"content": "jsonl two"}) + "\n")
    with gzip.open(d / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "gz one", "id": 1}) + "\n")
    src = resolve_sources([{"path": str(d), "text_field": "content"}])[0]
    assert [p.name for p in src.files] == ["a.txt", "b.txt", "d.jsonl.gz", "c.jsonl"]
    assert list(src.documents()) == ["first file", "second file", "gz one", "jsonl one", "jsonl two"]
    glob_src = resolve_sources([{"path": str(d / "*.txt")}])[0]
    assert list(glob_src.documents()) == ["first file", "second file"]
    single = resolve_sources([{"path": str(d / "b.txt")}, "stdlib"])
    assert single[1].kind == "stdlib" and list(single[0].documents()) == ["second file"]


@pytest.mark.parametrize("entry, message", [
    ({"path": "/no/such/dir"}, "does not exist"),
    ({"path": "/no/such/*.txt"}, "matches no"),
    ({"path": "EMPTYDIR"}, "directory without"),
    ({"path": "NOTES"}, "is not a"),
])
def test_missing_corpus_is_a_one_line_error(tmp_path, entry, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("x")
    entry = {"path": entry["path"].replace("EMPTYDIR", str(tmp_path / "empty")).replace("NOTES", str(tmp_path / "notes.md"))}
    with pytest.raises(DataError, match=message) as e:
        build(tmp_path, "ds", [entry])
    assert "\n" not in str(e.value) and "data.sources[0]" in str(e.value)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_empty_documents_and_bad_jsonl_name_the_culprit(tmp_path):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match=r"data.sources\[0\].*holds no text"):
        build(tmp_path, "ds1", [{"path": str(tmp_path / "blank")}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        build(tmp_path, "ds2", [{"path": str(bad)}])
    bad.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: no string field 'text' \(found \['body'\]\)"):
        build(tmp_path, "ds3", [{"path": str(bad)}])
    gz = tmp_path / "cut.jsonl.gz"
    lines = "".join(json.dumps({"text": " ".join(pseudo_words(i, 20))}) + "\n" for i in range(200))
    whole = gzip.compress(lines.encode())
    gz.write_bytes(whole[:len(whole) // 2])  # a download cut short
    with pytest.raises(DataError, match=r"cut.jsonl.gz: unreadable"):
        build(tmp_path, "ds4", [{"path": str(gz)}])


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    d = tmp_path / "corpus"
    texts = write_text_corpus(d, n_docs=40, words=pseudo_words(1))
    raw = texts[3].encode()
    (d / "doc_0003.txt").write_bytes(raw[:20] + b"\xff\xfe" + raw[20:40] + b"\xc3" + raw[40:])
    manifest = build(tmp_path, "ds", [{"path": str(d)}], val_fraction=0.02)
    m = load_manifest(manifest)
    assert m.totals["undecodable_bytes"] == 3 and m.totals["undecodable_documents"] == 1
    assert m.totals["documents"] == 40


def test_mixing_weights_set_shares_and_are_reproducible(tmp_path):
    a = write_text_corpus(tmp_path / "a", n_docs=30, words=pseudo_words(1), seed=1)
    write_text_corpus(tmp_path / "b", n_docs=120, words=pseudo_words(2), seed=2)
    sources = [{"path": str(tmp_path / "a"), "weight": 3.0}, {"path": str(tmp_path / "b"), "weight": 1.0}]
    m1 = load_manifest(build(tmp_path, "mix1", sources, seed=11))
    sa, sb = m1.sources
    share_a = sa["written_text_bytes"] / (sa["written_text_bytes"] + sb["written_text_bytes"])
    assert abs(share_a - 0.75) < 0.08  # weights are shares of the written text
    assert sa["written_documents"] > 2 * len(a)  # the small source is repeated to reach its share
    assert sb["written_documents"] < 120  # the large one is subsampled
    m2 = load_manifest(build(tmp_path, "mix2", sources, seed=11))
    assert m2.dataset_id == m1.dataset_id  # same inputs and seed: byte-identical shards
    m3 = load_manifest(build(tmp_path, "mix3", sources, seed=12))
    assert m3.dataset_id != m1.dataset_id


def test_a_binary_file_named_txt_is_named_as_not_text(tmp_path):
    """Issue 10.9: random bytes given as .txt used to end in "lower model.vocab_size" (or a
    tokenizer trained on U+FFFD); it is one line naming the file, and nothing is written."""
    d = tmp_path / "corpus"
    write_text_corpus(d, n_docs=20, words=pseudo_words(1))
    (d / "photo.txt").write_bytes(random.Random(0).randbytes(300_000))
    with pytest.raises(DataError) as e:
        build(tmp_path, "ds", [{"path": str(d)}])
    msg = str(e.value)
    assert "data.sources[0]" in msg and "photo.txt is not text" in msg and "binary" in msg, msg
    assert "\n" not in msg and "vocab_size" not in msg
    assert not (tmp_path / "ds" / "manifest.json").exists()
    with pytest.raises(DataError, match=r"photo\.txt is not text"):  # alone: was "lower model.vocab_size"
        build(tmp_path, "ds1", [{"path": str(d / "photo.txt")}])
    utf16 = tmp_path / "utf16"
    utf16.mkdir()
    (utf16 / "notes.txt").write_bytes(" ".join(pseudo_words(2)).encode("utf-16-le"))
    with pytest.raises(DataError, match=r"notes\.txt is not text"):
        build(tmp_path, "ds2", [{"path": str(utf16)}])


def test_one_huge_single_line_document_is_sampled_in_chunks(tmp_path):
    """Issue 10.8, scaled down: one 2 MB single-line document and a 0.05 MB tokenizer sample (the
    60 MB line vs 8 MB of the report). Drawn whole, it made the sample empty with probability
    1 - 0.05/2 ("the corpus has no text"); sampled in chunks it gives about the sample size."""
    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    big = tmp_path / "one_line.txt"
    text = " ".join(rng.choice(words) for _ in range(330_000))
    big.write_text(text)
    assert "\n" not in text and 1.9e6 < len(text) < 2.5e6
    manifest = build(tmp_path, "ds", [{"path": str(big)}], tokenizer_sample_mb=0.05, val_fraction=0.01)
    m = load_manifest(manifest)
    assert m.vocab_size == VOCAB and m.splits["train"].rows > 0
    assert m.totals["documents"] == 1
