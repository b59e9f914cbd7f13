"""Distributed prepare: ``--part I/N`` + ``--merge`` give shards byte-identical to a one-process
build whatever N is; missing parts are named; a killed part is rerun alone; CLI errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_assets import tiny_data_config, write_text_corpus
from data_pipeline import DataError, load_manifest
from data_pipeline.prepare import _ranges, parse_part, prepare_from_config
from test_data_parquet import write_parquet_corpus

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


def config(tmp_path: Path, out: str, **kw):
    """Two sources with weights (Parquet row groups and .txt files) under a cap that cuts one of them
    inside a unit: every plan decision (mixing copies, hold-out, cap) is exercised."""
    if not (tmp_path / "pq").exists():
        write_parquet_corpus(tmp_path / "pq", files=3, rows=60, row_group_size=9)
        write_text_corpus(tmp_path / "txt", n_docs=50, seed=3)
    sources = [{"path": str(tmp_path / "pq"), "weight": 1.0}, {"path": str(tmp_path / "txt"), "weight": 2.0}]
    return tiny_data_config(tmp_path / out, seq_len=32, sources=sources, corpus_mb=kw.pop("corpus_mb", 0.05),
                            shard_size_mb=0.01, encode_procs=1, encode_threads=1, **kw)


def shard_bytes(manifest: Path) -> dict[str, bytes]:
    m = load_manifest(manifest)
    return {s.url: Path(s.location).read_bytes() for s in m.shards} | {"tok": Path(m.tokenizer_location).read_bytes()}


def test_parts_then_merge_are_byte_identical_to_one_process_for_any_n(tmp_path):
    ref = prepare_from_config(config(tmp_path, "one"), VOCAB, quiet=True)
    want = shard_bytes(ref)
    assert len(want) > 4
    for n in (1, 2, 3, 5):
        cfg = config(tmp_path, f"n{n}")
        for i in reversed(range(n)):  # any order
            marker = prepare_from_config(cfg, VOCAB, quiet=True, part=(i, n))
            assert marker.name == f"part-{i:05d}-of-{n:05d}.json"
        manifest = prepare_from_config(cfg, VOCAB, quiet=True, merge=True)
        m = load_manifest(manifest)
        assert shard_bytes(manifest) == want, f"N={n}: shards differ from the one-process build"
        assert m.dataset_id == load_manifest(ref).dataset_id and m.raw["build"]["parts"] == n
        assert m.raw["sources"] == load_manifest(ref).raw["sources"] and m.splits["train"].rows == load_manifest(ref).splits["train"].rows
        assert not (tmp_path / f"n{n}" / "parts").exists()
        # Done: a part, the merge and a one-process prepare all say "up to date".
        assert prepare_from_config(cfg, VOCAB, quiet=True, part=(0, n)) == manifest
        assert prepare_from_config(cfg, VOCAB, quiet=True) == manifest


def test_merge_names_missing_parts_and_changed_inputs_are_refused(tmp_path, capsys):
    cfg = config(tmp_path, "ds")
    with pytest.raises(DataError, match="parts/plan.json does not exist"):
        prepare_from_config(cfg, VOCAB, quiet=True, merge=True)
    for i in (0, 2, 3):
        prepare_from_config(cfg, VOCAB, quiet=True, part=(i, 5))
    with pytest.raises(DataError) as e:
        prepare_from_config(cfg, VOCAB, quiet=True, merge=True)
    msg = str(e.value)
    assert "2 of 5 parts are missing or unfinished: 1, 4" in msg and "--array=1,4" in msg and "\n" not in msg
    assert not (tmp_path / "ds" / "manifest.json").exists()
    # A rerun of a finished part does nothing.
    marker = prepare_from_config(cfg, VOCAB, quiet=True, part=(2, 5))
    assert "part 2/5 is already complete" in capsys.readouterr().out and marker.exists()
    # Other inputs while parts of a plan exist: refused, naming the plan.
    with pytest.raises(DataError, match=r"parts/plan.json was made from other inputs"):
        prepare_from_config(config(tmp_path, "ds", seed=99), VOCAB, quiet=True, part=(1, 5))
    for i in (1, 4):
        prepare_from_config(cfg, VOCAB, quiet=True, part=(i, 5))
    assert prepare_from_config(cfg, VOCAB, quiet=True, merge=True).exists()


def test_a_killed_part_leaves_no_marker_and_is_rerun_alone(tmp_path):
    cfg_kw = dict(corpus_mb=1.5)
    ref = load_manifest(prepare_from_config(config(tmp_path, "one", **cfg_kw), VOCAB, quiet=True))
    out = tmp_path / "ds"
    prepare_from_config(config(tmp_path, "ds", **cfg_kw), VOCAB, quiet=True, part=(0, 2))  # makes the plan
    script = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
              "from pathlib import Path; from test_prepare_parts import config; "
              "from data_pipeline.prepare import prepare_from_config\n"
              f"prepare_from_config(config(Path({str(tmp_path)!r}), 'ds', corpus_mb=1.5), {VOCAB}, quiet=True, part=(1, 2))")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list((out / "parts").glob("part-00001-of-00002.*.tmp*")):
        assert proc.poll() is None, f"part 1 ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "parts" / "part-00001-of-00002.json").exists()
    with pytest.raises(DataError, match=r"1 of 2 parts are missing or unfinished: 1;"):
        prepare_from_config(config(tmp_path, "ds", **cfg_kw), VOCAB, quiet=True, merge=True)
    prepare_from_config(config(tmp_path, "ds", **cfg_kw), VOCAB, quiet=True, part=(1, 2))  # alone
    assert not list((out / "parts").glob("*.tmp*"))  # the killed run's leftovers are gone
    m = load_manifest(prepare_from_config(config(tmp_path, "ds", **cfg_kw), VOCAB, quiet=True, merge=True))
    assert m.dataset_id == ref.dataset_id


def test_part_syntax_and_cli_errors(tmp_path):
    assert parse_part("3/8") == (3, 8) and parse_part(" 0 / 1 ") == (0, 1)
    for bad in ("8/8", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(DataError, match="is invalid: use I/N"):
            parse_part(bad)
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and _ranges([3], ",") == "3"
    exe = Path(sys.executable).with_name("slam-pretrain")
    base = [str(exe), "prepare", "--config", str(REPO / "configs/tiny_cpu.yaml"), "--set", f"data.dataset_dir={tmp_path / 'x'}"]
    for extra, needle in ((["--part", "2/2"], "--part '2/2' is invalid"), (["--part", "0/2", "--merge"], "two steps"),
                          (["--merge"], "plan.json does not exist")):
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr
