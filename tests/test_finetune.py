"""``slam-pretrain finetune`` / ``classify`` through the real CLI: a tiny model pretrained by the
shipped trainer is fine-tuned to tell which of three standard-library modules a snippet comes from,
beats the majority class on held-out snippets, resumes exactly, and classifies from the command
line; bad label files are one line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from train_utils import REPO, base_overrides, env_for_tests, losses, run_train

MODULES = ["decimal", "http/client", "asyncio/tasks"]  # real text, three clearly different topics


def snippets(n_per_class: int, seed: int = 0) -> list[dict]:
    """Three-line snippets of each module's source, labelled by module."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    rows = []
    for name in MODULES:
        path = stdlib / f"{name}.py"
        if not path.exists():
            path = stdlib / f"_py{name}.py"
        lines = [ln for ln in path.read_text().splitlines() if len(ln.strip()) > 20]
        for _ in range(n_per_class):
            i = rng.randrange(len(lines) - 3)
            rows.append({"text": "\n".join(lines[i:i + 3]), "label": name.split("/")[-1]})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slam_pretrain", *args], cwd=REPO, env=env_for_tests(),
                          capture_output=True, text=True, timeout=timeout)


def finetune_args(init: Path, train: Path, val: Path, out: Path, steps: int, extra: tuple = ()) -> list[str]:
    # The pretraining test settings (tiny_cpu.yaml, DeepSpeed ZeRO-1 fp32 on CPU, no MLflow); the
    # data section is not read by finetune.
    base = base_overrides(init / "manifest.json", out, steps=steps, micro=8, global_batch=16, interval=10)
    sets = ["train.lr=2e-3", "train.lr_schedule=constant", "train.warmup_steps=5", "train.eval_interval=20",
            f"finetune.train_file={train}", f"finetune.val_file={val}", "finetune.max_len=64", *extra]
    for s in sets:
        base += ["--set", s]
    return ["finetune", "--init", str(init), *base]


@pytest.fixture(scope="module")
def pretrained(tiny_manifest: Path, tmp_path_factory) -> Path:
    """A checkpoint of the tiny model after 8 steps of the shipped trainer."""
    out = tmp_path_factory.mktemp("pre") / "run"
    r = run_train(1, base_overrides(tiny_manifest, out, steps=8, interval=8))
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "checkpoints" / "step_00000008"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ft_data")
    rows = snippets(100)
    return write_jsonl(root / "train.jsonl", rows[:240]), write_jsonl(root / "val.jsonl", rows[240:])


def test_finetune_beats_majority_and_classifies(pretrained: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = data
    out = tmp_path / "ft"
    r = cli(*finetune_args(pretrained, train, val, out, steps=60))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [rec for rec in records if rec.get("split") == "val"]
    assert [rec["step"] for rec in evals] == [20, 40, 60]
    gold = [json.loads(line)["label"] for line in val.read_text().splitlines()]
    majority = max(gold.count(c) for c in set(gold)) / len(gold)
    final = evals[-1]
    assert final["val_acc"] >= majority + 0.2, (final, majority)
    assert 0 < final["val_macro_f1"] <= 1
    # classify: the label and the probabilities of every class, from the run folder.
    text = "\n".join(json.loads(line)["text"] for line in val.read_text().splitlines()[:1])
    c = cli("classify", "--checkpoint", str(out), "--input", text)
    assert c.returncode == 0, c.stderr[-2000:]
    lines = c.stdout.strip().splitlines()
    assert lines[0] in {"decimal", "client", "tasks"}
    probs = {name: float(p) for name, p in (ln.split() for ln in lines[1:])}
    assert set(probs) == {"decimal", "client", "tasks"} and abs(sum(probs.values()) - 1) < 1e-3
    assert lines[0] == max(probs, key=probs.get)


def test_finetune_resumes_exactly(pretrained: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    train, val = data
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli(*finetune_args(pretrained, train, val, whole, steps=20)).returncode == 0
    first = cli(*finetune_args(pretrained, train, val, parts, steps=10))
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli(*finetune_args(pretrained, train, val, parts, steps=20))
    assert second.returncode == 0 and "resumed from step 10" in second.stdout, second.stdout[-2000:]
    a, b = losses(whole), losses(parts)
    assert sorted(b) == list(range(1, 21))
    assert [b[s] for s in range(11, 21)] == [a[s] for s in range(11, 21)]


@pytest.mark.parametrize("rows,expect", [
    (["{not json"], "not a JSON object"),
    ([{"text": "a b c", "category": "x"}], "needs the fields 'text' and 'label'"),
    ([{"text": "a b c", "label": "x"}, {"text": "d e f", "label": "x"}], "needs at least 2 classes"),
    ([{"text": "", "label": "x"}], "must be a non-empty string"),
], ids=["not-json", "missing-field", "one-class", "empty-text"])
def test_bad_label_files_are_one_line(pretrained: Path, tmp_path: Path, rows: list, expect: str) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    r = cli(*finetune_args(pretrained, bad, bad, tmp_path / "out", steps=2))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
