"""Long-context evaluation (`slam-pretrain eval-long`) on a tiny model with a real checkpoint
(DeepSpeed engine + CheckpointManager, hf_assets) trained with the shared tiny dataset's tokenizer:

- loss by position equals a hand computation from per-token losses of an independent forward pass
  (full logits + cross-entropy), grouped into the expected buckets, counting exactly the target
  tokens (the last val row's padding excluded);
- passkey prompts have exactly the asked length with the needle at the asked depth; accuracy by
  generation is the fraction of correct answers among independent greedy generations (the
  recompute path, one prompt at a time), by log-likelihood the fraction of trials whose key
  scores highest in an independent computation;
- the CLI prints the table, writes the JSON and valid PNGs, logs the numbers to the run's MLflow
  store (a new run, or a given run whose status it leaves alone); mistakes are one line, exit 2,
  nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_assets import REPO, make_checkpoints, run_config

TINY = dict(vocab_size=2048, max_seq_len=256, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, ef_cycles=1,
            segment_len=48, overlap=8, tie_embeddings=True)
SEED = 1234  # run.seed: orders the validation rows


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "slam_pretrain", "eval-long", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_manifest: Path) -> dict:
    """A real checkpoint of the tiny model (2 steps) whose config points at the shared dataset and
    at an MLflow SQLite store of its own."""
    root = tmp_path_factory.mktemp("long_eval")
    tok = root / "tokenizer.model"  # a copy: the checkpoint subprocess runs in the tokenizer's folder
    shutil.copyfile(tiny_manifest.parent / "tokenizer.model", tok)
    cfg = run_config(root / "run", 128, **TINY)
    cfg.data.dataset_dir = str(tiny_manifest.parent)
    cfg.run.seed = SEED
    cfg.tracking.uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg.validate()
    make_checkpoints(tok, [cfg])
    return {"out_dir": root / "run", "step_dir": root / "run" / "checkpoints" / "step_00000002",
            "uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment, "root": root}


@pytest.fixture(scope="module")
def export(run: dict) -> Path:
    """The checkpoint exported to root/exp/tiny.safetensors (its config.yaml beside it)."""
    from slam_pretrain.downstream.export import export_checkpoint

    return export_checkpoint(run["step_dir"], run["root"] / "exp" / "tiny.safetensors")


@pytest.fixture(scope="module")
def loaded(run: dict):
    from slam_pretrain.downstream.export import load_model

    return load_model(run["step_dir"])


# ---------------------------------------------------------------------------------------------
# Buckets.

def test_bucket_starts_and_means() -> None:
    from slam_pretrain.downstream.position_loss import bucket_losses, bucket_starts
    from slam_pretrain.errors import UserError

    assert bucket_starts("pow2", 128) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert bucket_starts("pow2", 100) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert bucket_starts("pow2", 129) == [0, 1, 2, 4, 8, 16, 32, 64, 128]
    assert bucket_starts("width:48", 128) == [0, 48, 96]
    assert bucket_starts("0,10,200", 128) == [0, 10]  # a start past the end covers nothing
    for bad in ("pow3", "width:0", "width:x", "5,10", "0,10,10", "0,a", ""):
        with pytest.raises(UserError, match="--buckets"):
            bucket_starts(bad, 128)
    sums, counts = [2.0, 3.0, 5.0, 0.0, 8.0], [1, 1, 2, 0, 4]
    assert bucket_losses(sums, counts, [0, 1, 3]) == [
        {"start": 0, "end": 1, "tokens": 1, "mean_loss": 2.0},
        {"start": 1, "end": 3, "tokens": 3, "mean_loss": 8.0 / 3},
        {"start": 3, "end": 5, "tokens": 4, "mean_loss": 2.0}]
    assert bucket_losses([0.0, 0.0], [0, 0], [0])[0]["mean_loss"] is None


# ---------------------------------------------------------------------------------------------
# Loss by position against a hand computation.

def _hand_bucket_losses(model, manifest, rows: int, edges: list[tuple[int, int]]
                        ) -> tuple[int, list[tuple[int, float]]]:
    """(rows, [(tokens, mean loss)] per (first, last) position): the val rows read in batches of 5
    (not the evaluator's 8), one full forward each, per-token cross-entropy, -100 not counted."""
    from data_pipeline.loader import build_loader

    loader = build_loader(manifest, rank=0, world_size=1, micro_batch_size=5, seed=SEED, num_workers=0, split="val")
    xs, ys = [], []
    for batch in loader:
        xs.append(batch["input_ids"])
        ys.append(batch["labels"])
    n = rows or loader.num_rows
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    with torch.no_grad():
        logits = model(x)
    per_token = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")  # [n, L]
    out = []
    for first, last in edges:
        values = [float(per_token[r, p]) for r in range(n) for p in range(first, last + 1) if int(y[r, p]) != -100]
        out.append((len(values), sum(values) / len(values)))
    return n, out


@pytest.mark.parametrize("spec,edges,rows", [
    ("pow2", [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127)], 20),
    ("width:48", [(0, 47), (48, 95), (96, 127)], 0),  # every val row, the padded last one included
])
def test_loss_by_position_matches_hand_computation(loaded, tiny_manifest: Path, spec: str, edges, rows: int) -> None:
    from data_pipeline.manifest import load_manifest
    from slam_pretrain.downstream.long_eval import eval_long

    model, tokenizer, meta = loaded
    manifest = load_manifest(tiny_manifest)
    rec = eval_long(model, tokenizer, meta, manifest=manifest, val_rows=rows, buckets=spec, data_seed=SEED,
                    lengths=[], batch_size=8)["loss_by_position"]
    n, hand = _hand_bucket_losses(model, manifest, rows, edges)
    assert rec["rows"] == n == (rows or manifest.splits["val"].rows) and rec["seq_len"] == 128
    assert [(b["start"], b["end"] - 1) for b in rec["buckets"]] == edges
    assert [b["tokens"] for b in rec["buckets"]] == [t for t, _ in hand]
    for b, (_, mean) in zip(rec["buckets"], hand):
        assert b["mean_loss"] == pytest.approx(mean, rel=1e-5), b
    assert rec["tokens"] == sum(t for t, _ in hand)
    if not rows:  # the val split ends in a padded row: its pad targets are not counted
        assert rec["tokens"] < n * 128


# ---------------------------------------------------------------------------------------------
# Passkey retrieval against independent generations and scores.

def _trials(tokenizer, lengths, depths, trials):
    from slam_pretrain.downstream.passkey import make_keys, passkey_trials

    return passkey_trials(tokenizer, lengths, depths, make_keys(trials, 0))


def test_passkey_prompts_and_generation_accuracy(loaded) -> None:
    from slam_pretrain.downstream.generate import generate_ids
    from slam_pretrain.downstream.long_eval import eval_long
    from slam_pretrain.downstream.passkey import INTRO, NEEDLE, QUESTION, first_number, make_keys, min_passkey_length

    model, tok, meta = loaded
    shortest = min_passkey_length(tok, make_keys(3, 0))
    lengths, depths = [shortest, 200, 256], [0.0, 0.5, 1.0]  # no filler at all, and the model's whole window
    trials = _trials(tok, lengths, depths, 3)
    intro, question = tok.encode(INTRO), tok.encode(QUESTION)
    for t in trials:
        needle = tok.encode(NEEDLE.format(key=t.key))
        assert len(t.ids) + t.room == t.length and t.ids[0] == tok.eos_id
        assert t.ids[t.needle_at:t.needle_at + len(needle)] == needle and t.ids[-len(question):] == question
        n_fill = t.length - t.room - 1 - len(intro) - len(needle) - len(question)
        assert t.needle_at - 1 - len(intro) == round(t.depth * n_fill)
        assert (n_fill == 0) == (t.length == shortest)

    rec = eval_long(model, tok, meta, lengths=lengths, depths=depths, trials=3, scoring="generate")["passkey"]
    assert len(rec["records"]) == len(trials) == 27
    right: dict = {}
    for t, r in zip(trials, rec["records"]):
        new = generate_ids(model, t.ids, t.room, temperature=0.0, eos_id=tok.eos_id, use_cache=False, notify=None)
        text = tok.decode(new)
        assert (r["key"], r["output_ids"], r["output"]) == (t.key, new, text)
        assert r["correct"] == (first_number(text) == t.key)
        right.setdefault((t.length, t.depth), []).append(first_number(text) == t.key)
    for c in rec["cells"]:
        hits = right[(c["length"], c["depth"])]
        assert (c["correct"], c["trials"], c["accuracy"]) == (sum(hits), 3, sum(hits) / 3)
    assert rec["mean_accuracy"] == sum(sum(h) for h in right.values()) / 27
    # What counts as found: the first number of the answer, exactly.
    assert first_number(" 60494. Remember it") == "60494" and first_number(" 604941") != "60494"
    assert first_number(" is is is") is None


def test_passkey_loglik_accuracy(loaded) -> None:
    from slam_pretrain.downstream.long_eval import eval_long
    from slam_pretrain.downstream.passkey import ANSWER, make_keys, min_passkey_length

    model, tok, meta = loaded
    lengths, depths = [min_passkey_length(tok, make_keys(4, 0)), 256], [0.0, 1.0]
    rec = eval_long(model, tok, meta, lengths=lengths, depths=depths, trials=4, scoring="loglik",
                    candidates=3, batch_size=4)["passkey"]
    right: dict = {}
    for t, r in zip(_trials(tok, lengths, depths, 4), rec["records"]):
        assert r["key"] == t.key and len(r["scores"]) == 3 and t.key in r["scores"]
        mine = {}
        for cand in r["scores"]:
            ans = tok.encode(ANSWER.format(key=cand))
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([t.ids + ans[:-1]])).float(), dim=-1)[0]
            mine[cand] = sum(float(logp[len(t.ids) - 1 + j, a]) for j, a in enumerate(ans))
            assert r["scores"][cand] == pytest.approx(mine[cand], abs=1e-3)
        ok = mine[t.key] > max(v for k, v in mine.items() if k != t.key)
        assert r["correct"] == ok
        right.setdefault((t.length, t.depth), []).append(ok)
    assert [(c["length"], c["depth"], c["accuracy"]) for c in rec["cells"]] == [
        (n, d, sum(right[(n, d)]) / 4) for n in lengths for d in depths]


# ---------------------------------------------------------------------------------------------
# The command.

def _png_ok(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, img.shape


def test_cli_table_json_plots_mlflow(run: dict, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from slam_pretrain.downstream.long_eval_report import metrics_of

    out = tmp_path / "ev"
    r = _cli("--checkpoint", str(run["out_dir"]), "--lengths", "160,256", "--depths", "0,1", "--trials", "2",
             "--val-rows", "16", "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "positions" in r.stdout and "64-127" in r.stdout and "length / depth" in r.stdout
    rec = json.loads((out / "eval_long.json").read_text())
    assert rec["format"] == "slam-pretrain-eval-long-v1" and rec["checkpoint"]["step"] == 2
    assert rec["loss_by_position"]["rows"] == 16 and rec["passkey"]["lengths"] == [160, 256]
    assert rec["plots"] == {"loss_by_position": "loss_by_position.png", "passkey": "passkey.png"}
    for name in rec["plots"].values():
        _png_ok(out / name)
    assert sorted(p.name for p in out.iterdir()) == ["eval_long.json", "loss_by_position.png", "passkey.png"]

    # Tracking is on in the run's config: a new run in its experiment, metrics at the checkpoint's step.
    client = MlflowClient(tracking_uri=run["uri"])
    exp = client.get_experiment_by_name(run["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'eval-long-step2'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = runs[0].data.metrics
    assert logged == pytest.approx(metrics_of(rec)) and "eval_long/loss/pos_64-127" in logged
    assert "eval_long/passkey/len_256/depth_1.00" in logged
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "eval_long/loss/mean")] == [2]
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "eval_long/step_00000002")}
    assert arts == {f"eval_long/step_00000002/{n}" for n in ("eval_long.json", "loss_by_position.png", "passkey.png")}


def _args(*argv: str):
    """The eval-long arguments as the CLI parses them (add_eval_long_parser on a parser of our own)."""
    import argparse

    from slam_pretrain.downstream.long_eval import add_eval_long_parser

    parser = argparse.ArgumentParser()
    add_eval_long_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval-long", *argv])


def test_export_into_a_given_run(run: dict, export: Path, capsys) -> None:
    """An export, logged into an existing run (a training run still RUNNING stays RUNNING); default
    lengths, capped at max_seq_len; default output next to the export; passkey only."""
    from mlflow import MlflowClient

    from slam_pretrain.downstream.long_eval import eval_long_cli
    from slam_pretrain.downstream.long_eval_report import metrics_of

    client = MlflowClient(tracking_uri=run["uri"])
    exp = client.get_experiment_by_name(run["experiment"])
    exp_id = exp.experiment_id if exp else client.create_experiment(
        run["experiment"], artifact_location=(run["root"] / "mlartifacts").as_uri())
    target = client.create_run(exp_id, run_name="training").info.run_id
    args = _args("--checkpoint", str(export), "--no-loss", "--trials", "1", "--mlflow-run-id", target)
    assert eval_long_cli(args) == 0
    captured = capsys.readouterr()
    assert "capped at model.max_seq_len=256" in captured.err and "positions" not in captured.out
    out = export.with_name("tiny.eval_long")
    rec = json.loads((out / "eval_long.json").read_text())
    assert rec["passkey"]["lengths"] == [128, 256] and "loss_by_position" not in rec
    assert rec["plots"] == {"passkey": "passkey.png"}
    _png_ok(out / "passkey.png")
    got = client.get_run(target)
    assert got.info.status == "RUNNING" and got.data.metrics == pytest.approx(metrics_of(rec))


def test_cli_mistakes_are_one_line(run: dict, export: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    cases = [
        (("--checkpoint", str(tmp_path / "nope")), "does not exist"),
        (("--checkpoint", str(export), "--lengths", "128,512"), "--lengths 512 is longer than model.max_seq_len=256"),
    ]
    for args, says in cases:
        r = _cli(*args, "--output", str(out), "--no-mlflow")
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("slam-pretrain eval-long: error: "), (args, r.stderr)
        assert says in lines[0] and "Traceback" not in r.stderr, (args, lines)
        assert not out.exists()


def test_mistakes_found_before_any_work(run: dict, export: Path, tmp_path: Path, capsys) -> None:
    """The same checks in process (what the CLI turns into one line): each names the flag or file."""
    from data_pipeline.errors import DataError
    from slam_pretrain.downstream.long_eval import eval_long_cli
    from slam_pretrain.errors import UserError

    out = tmp_path / "never"
    ck = str(run["step_dir"])
    cases = [
        (("--checkpoint", str(export), "--buckets", "pow3"), UserError, "--buckets 'pow3' is invalid"),
        (("--checkpoint", str(export), "--depths", "0,1.5"), UserError, "--depths '0,1.5' is invalid"),
        (("--checkpoint", str(export), "--lengths", "12"), UserError, "--lengths 12 is too short"),
        (("--checkpoint", str(export), "--lengths", "a,b"), UserError, "--lengths 'a,b' is invalid"),
        (("--checkpoint", str(export), "--no-loss", "--no-passkey"), UserError, "nothing to evaluate"),
        (("--checkpoint", str(export), "--seq-len", "200"), UserError, "--seq-len 200 is invalid"),
        (("--checkpoint", str(export), "--trials", "0"), UserError, "--trials 0 is invalid"),
        (("--checkpoint", ck, "--manifest", str(tmp_path / "nodata")), DataError, "not found"),
        (("--checkpoint", ck, "--mlflow-run-id", "0123456789abcdef0123456789abcdef"), UserError, "no such run"),
    ]
    # An export whose config names a dataset that is not there, and one that lost its config.
    import yaml

    from slam_pretrain.downstream.export import export_paths

    for name, dataset_dir in (("moved", "no/such/dataset"), ("bare", None)):
        copy = tmp_path / name / "tiny.safetensors"
        copy.parent.mkdir()
        for src, dst in zip(export_paths(export), export_paths(copy)):
            shutil.copyfile(src, dst)
        cfg_path = export_paths(copy)[1]
        if dataset_dir is None:
            cfg_path.unlink()
            cases.append((("--checkpoint", str(copy)), UserError, "has no run config next to it"))
        else:
            cfg = yaml.safe_load(cfg_path.read_text())
            cfg["data"]["dataset_dir"] = dataset_dir
            cfg_path.write_text(yaml.safe_dump(cfg))
            cases.append((("--checkpoint", str(copy)), UserError, "no dataset at data.dataset_dir='no/such/dataset'"))
    for argv, kind, says in cases:
        with pytest.raises(kind) as e:
            eval_long_cli(_args(*argv, "--output", str(out)))
        assert says in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))
        assert not out.exists() and "[eval-long]" not in capsys.readouterr().err, argv  # no work began
