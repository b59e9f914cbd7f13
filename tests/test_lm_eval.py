"""lm-evaluation-harness over SLAM (`slam-pretrain eval`): the adapter's log-likelihoods (batched,
padded, truncated, rolling) equal a direct computation with our model; a tiny model trained here
for a few hundred steps on runs of consecutive letters scores far above chance on the local
multiple-choice task about them (tests/lm_eval_tasks/, YAML + JSONL, nothing downloaded), and on
the generation task through the KV cache; the CLI prints the table, writes JSON and logs to MLflow.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path

_HF_TMP = tempfile.mkdtemp(prefix="slam-lmeval-test-")
atexit.register(shutil.rmtree, _HF_TMP, ignore_errors=True)
for _key, _sub in (("HF_HOME", "home"), ("HF_MODULES_CACHE", "modules"), ("HF_DATASETS_CACHE", "datasets")):
    os.environ[_key] = os.path.join(_HF_TMP, _sub)
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_assets import REPO, make_checkpoints, run_config, train_tokenizer  # noqa: E402

pytest.importorskip("lm_eval", reason="the 'eval' extra (make test installs it)")

TASKS = REPO / "tests" / "lm_eval_tasks"
VOCAB = 400
LETTERS = string.ascii_lowercase


def _letter_run(rng: random.Random, shortest: int = 4, longest: int = 20) -> str:
    k = rng.randint(shortest, longest)
    start = rng.randint(0, 26 - k)
    return " ".join(LETTERS[start:start + k])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """BPE on stdlib code plus runs of letters, so that " x" is one piece for every letter (a
    model then learns the next letter as one next token)."""
    from data_pipeline.tokenizer import Tokenizer

    rng = random.Random(1)
    runs = "\n".join([_letter_run(rng) for _ in range(3000)] + [" ".join(LETTERS)] * 300)
    tok = Tokenizer(train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB, extra=[runs]))
    assert [tok.id_to_piece(i) for i in tok.encode(" ".join(LETTERS))] == ["a"] + [f"▁{c}" for c in LETTERS[1:]]
    return tok


def _model(seed: int = 0, **overrides):
    from slam_pretrain.model import ModelConfig, SLAMv1LM

    cfg = dict(vocab_size=VOCAB, max_seq_len=64, d_model=48, num_heads=4, num_kv_heads=2, d_ff=96, ef_cycles=1,
               segment_len=16, overlap=4)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return SLAMv1LM(ModelConfig(**cfg)).eval()


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _direct_loglikelihood(model, ids: list[int], n_ctx: int) -> tuple[float, bool]:
    """sum log p(ids[t] | ids[:t]) for t >= n_ctx, one unbatched forward (the last max_seq_len + 1 tokens)."""
    keep = ids[-(model.config.max_seq_len + 1):]
    n_cont = len(ids) - n_ctx
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([keep[:-1]]))[0].float(), dim=-1)[-n_cont:]
    target = torch.tensor(keep[-n_cont:])
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


@pytest.mark.parametrize("preset", ["modern", "fractional"])
def test_loglikelihoods_equal_direct_computation(tokenizer, preset: str) -> None:
    from slam_pretrain.downstream.lm_eval_adapter import make_lm

    model = _model(init_std=0.3) if preset == "modern" else _model(
        init_std=0.3, segment_len=0.6, overlap=0.2, norm="layernorm", norm_position="post", ffn="gelu",
        pos_encoding="learned", tie_embeddings=False)
    lm = make_lm(model, tokenizer, batch_size=3)
    eos = tokenizer.eos_id
    long_ctx = "def f(x):\n    return x * 2\n" * 12  # longer than max_seq_len: truncated on the left
    pairs = [("k l m n", " o"), ("The quick brown", " fox jumps"), ("", "hello world"), (long_ctx, " done"),
             ("naïve ", "façade"), ("x", " = 1\n"), ("a b", " c d e f")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        if ctx:
            ctx_ids = tokenizer.encode(ctx.rstrip())  # lm-eval moves trailing spaces to the continuation
            whole = tokenizer.encode(ctx.rstrip() + ctx[len(ctx.rstrip()):] + cont)
        else:
            ctx_ids, whole = [], tokenizer.encode(cont)
        assert whole[:len(ctx_ids)] == ctx_ids
        want, want_greedy = _direct_loglikelihood(model, [eos] + whole, 1 + len(ctx_ids))
        assert abs(score - want) < 1e-4 and greedy == want_greedy, (ctx[:20], cont, score, want)
    # Rolling log-likelihood (perplexity): every token given EOS and all before it, within one window.
    texts = ["a b c d e f g", "def main():\n    pass\n"]
    rolled = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    for text, score in zip(texts, rolled):
        ids = [eos] + tokenizer.encode(text)
        assert abs(score - _direct_loglikelihood(model, ids, 1)[0]) < 1e-4
    # A text longer than the context: lm-eval's disjoint windows. The first predicts its n tokens
    # after EOS; each next one the following n (the last: what is left) from the max_seq_len tokens
    # before its end.
    long_ids = tokenizer.encode(long_ctx)
    (score,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(long_ctx,)]))
    n = model.config.max_seq_len
    want = _direct_loglikelihood(model, [eos] + long_ids[:n], 1)[0]
    for start in range(n, len(long_ids), n):
        end = min(start + n, len(long_ids))
        window = long_ids[end - n - 1:end]
        want += _direct_loglikelihood(model, window, len(window) - (end - start))[0]
    assert abs(score - want) < 1e-3


def _train_on_letter_runs(model, tokenizer, steps: int = 150) -> None:
    """Plain AdamW on runs of consecutive letters ("f g h i j"), each after EOS."""
    rng = random.Random(0)
    eos = tokenizer.eos_id
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(16):
            rows.append([eos] + tokenizer.encode(_letter_run(rng)))
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [eos] * (width - len(r)) for r in rows])
        y = torch.tensor([r[1:] + [-100] * (width - len(r) + 1) for r in rows])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def test_trained_model_beats_chance(tokenizer) -> None:
    from slam_pretrain.downstream.lm_eval_adapter import evaluate, flat_scores

    model = _model()
    tasks = ["slam_next_letter", "slam_next_letter_gen", "slam_letters_ppl"]
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend (2 shared cores)
    try:
        _train_on_letter_runs(model, tokenizer)
        results = evaluate(model, tokenizer, tasks, include_path=[str(TASKS)], include_defaults=False,
                           bootstrap_iters=0)
    finally:
        torch.set_num_threads(threads)
    scores = flat_scores(results)
    n = results["n-samples"]["slam_next_letter"]["effective"]
    assert n == 48
    # 4 choices: chance is 12 of 48; a model that learned the pattern gets nearly all.
    assert round(scores["slam_next_letter/acc"] * n) >= 40, scores
    # Generation (greedy, through the KV cache): the next letter, as text.
    assert round(scores["slam_next_letter_gen/exact_match"] * n) >= 40, scores
    # Perplexity per word (letter): only the first letter of a run is a guess (1/26) after training;
    # an untrained model is near the vocabulary size (400).
    assert scores["slam_letters_ppl/word_perplexity"] < 5, scores


def test_cli_eval_table_json_mlflow(tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_checkpoints(Path(tokenizer.path), [run_config(run, 64, vocab_size=VOCAB, max_seq_len=64, d_model=32,
                                                       num_heads=4, d_ff=64, ef_cycles=1, segment_len=16,
                                                       overlap=4)])
    out = tmp_path / "eval" / "results.json"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "slam_pretrain", "eval", "--checkpoint", str(run), "--tasks",
                        "slam_next_letter,slam_letters_ppl", "--limit", "8", "--include-path", str(TASKS),
                        "--no-default-tasks", "--output", str(out), "--bootstrap-iters", "0", "--mlflow-uri", uri],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "slam_next_letter" in r.stdout and "acc" in r.stdout and "|" in r.stdout  # lm-eval's table
    data = json.loads(out.read_text())
    assert data["slam_pretrain"]["step"] == 2 and data["n-samples"]["slam_next_letter"]["effective"] == 8
    assert 0.0 <= data["results"]["slam_next_letter"]["acc,none"] <= 1.0

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "slam-eval"]
    (run_info,) = client.search_runs([exp.experiment_id])
    assert run_info.data.metrics["eval/slam_next_letter/acc"] == data["results"]["slam_next_letter"]["acc,none"]
    assert "eval/slam_letters_ppl/word_perplexity" in run_info.data.metrics
    # Mistakes are one line, exit 2: an unknown task (with a suggestion), a bad --limit.
    for args, needle in ((["--tasks", "slam_next_leter"], "did you mean"), (["--tasks", "x", "--limit", "0"], "--limit")):
        r = subprocess.run([sys.executable, "-m", "slam_pretrain", "eval", "--checkpoint", str(run), "--include-path",
                            str(TASKS), "--no-default-tasks", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
