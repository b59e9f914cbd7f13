"""lm-evaluation-harness over a SLAM model (``slam-pretrain eval``).

``SLAMEvalLM(model, tokenizer)`` is an lm-eval ``TemplateLM`` (registered as ``slam``):

- ``loglikelihood``: every context starts after EOS, as documents do in training (an empty
  context is EOS alone); the continuation's tokens are scored from one forward pass over
  ``context + continuation`` (its last ``max_seq_len`` + 1 tokens when longer), rows of a batch
  right-padded. Right padding never changes a prefix-consistent model's logits; fractional layouts
  (the reference preset) depend on the length, so they score one request at a time.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_seq_len`` tokens, the
  first one after EOS (perplexity tasks).
- ``generate_until``: ``slam_pretrain.downstream.generate.generate_batch`` (the exact KV cache), greedy unless
  the task samples, then cut at the first stop string.

``evaluate(model, tokenizer, tasks, ...)`` runs ``lm_eval.simple_evaluate`` with a TaskManager
(``include_path`` adds folders of task YAML files); ``eval_cli`` prints lm-eval's table, writes the
results as JSON and optionally logs the scores to MLflow. Needs the ``eval`` extra (lm-eval).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from slam_pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

# torch, the model and lm-eval are imported where used: cli.py builds the `eval` parser from
# add_eval_parser for every command, which must stay cheap.


def require_lm_eval() -> None:
    """UserError (one line) when the ``eval`` extra is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("eval needs the 'eval' extra (lm-evaluation-harness): pip install -c constraints.txt "
                        "-e '.[eval]'") from None


def _template_lm() -> type:
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def make_lm(model: "torch.nn.Module", tokenizer: Any, batch_size: int = 8, max_gen_toks: int = 256):
    """A ``SLAMEvalLM`` (lm-eval imported on first use, so this module imports without it)."""
    return _lm_class()(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)


_LM_CLASS: Optional[type] = None


def _lm_class() -> type:
    global _LM_CLASS
    if _LM_CLASS is None:
        _LM_CLASS = _build_lm_class()
    return _LM_CLASS


def _build_lm_class() -> type:
    import torch
    import torch.nn.functional as F
    from lm_eval import utils as lm_utils
    from lm_eval.api.registry import register_model

    from slam_pretrain.downstream.generate import generate_batch

    class SLAMEvalLM(_template_lm()):
        """lm-eval model over SLAMv1LM and our Tokenizer (see the module docstring)."""

        backend = "causal"

        def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 8, max_gen_toks: int = 256):
            super().__init__()
            self.model, self.tokenizer_ = model.eval(), tokenizer
            self.batch_size = max(1, int(batch_size))
            self.max_gen_toks = int(max_gen_toks)
            self._device = next(model.parameters()).device

        # -- tokens ------------------------------------------------------------------------
        @property
        def eot_token_id(self) -> int:
            return self.tokenizer_.eos_id

        @property
        def prefix_token_id(self) -> int:
            return self.tokenizer_.eos_id  # a document starts after EOS

        @property
        def max_length(self) -> int:
            return self.model.config.max_seq_len

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
            return list(self.tokenizer_.encode(string))  # never adds BOS/EOS, as in training

        def tok_decode(self, tokens: list[int], **kwargs) -> str:
            return self.tokenizer_.decode(tokens)

        # -- log-likelihoods -----------------------------------------------------------------
        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            new = []
            for context, continuation in [req.args for req in requests]:
                if context == "":
                    ctx, cont = [], self.tok_encode(continuation)
                else:
                    ctx, cont = self._encode_pair(context, continuation)
                new.append(((context, continuation), [self.prefix_token_id] + ctx, cont))
            return self._loglikelihood_tokens(new, disable_tqdm=disable_tqdm)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """requests: (cache key, context ids, continuation ids) -> (sum log p, greedy?) each."""
            rows = []  # (index, input ids, continuation ids)
            for i, (_, ctx, cont) in enumerate(requests):
                if not cont:
                    raise ValueError("a request with an empty continuation")
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
                rows.append((i, whole[:-1], list(cont)))
            results: list[Optional[tuple[float, bool]]] = [None] * len(rows)
            batch = self.batch_size if self.model.config.prefix_consistent else 1
            rows.sort(key=lambda r: -len(r[1]))  # similar lengths together: less padding
            for start in range(0, len(rows), batch):
                chunk = rows[start:start + batch]
                width = max(len(inp) for _, inp, _ in chunk)
                tokens = torch.tensor([inp + [0] * (width - len(inp)) for _, inp, _ in chunk], device=self._device)
                logprobs = F.log_softmax(self.model(tokens).float(), dim=-1)  # [b, width, V]
                for r, (i, inp, cont) in enumerate(chunk):
                    lp = logprobs[r, len(inp) - len(cont):len(inp)]  # the predictions of cont's tokens
                    target = torch.tensor(cont, device=self._device)
                    score = float(lp.gather(-1, target[:, None]).sum())
                    greedy = bool((lp.argmax(dim=-1) == target).all())
                    results[i] = (score, greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            return results  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (text,) in [req.args for req in requests]:
                windows = [(None,) + w for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1))]
                total = sum(score for score, _ in self._loglikelihood_tokens(windows)) if windows else 0.0
                out.append(total)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            return out

        # -- generation ----------------------------------------------------------------------
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list[str] = []
            for start in range(0, len(requests), self.batch_size):
                chunk = requests[start:start + self.batch_size]
                groups: dict[str, list[int]] = {}  # same generation settings -> one generate_batch
                for j, req in enumerate(chunk):
                    groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(j)
                texts: list[Optional[str]] = [None] * len(chunk)
                for key, members in groups.items():
                    kwargs = dict(chunk[members[0]].args[1])
                    until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
                    until = [until] if isinstance(until, str) else list(until)
                    max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                    sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
                    keep = max(1, self.max_length - max_new)  # room for the continuation in the window
                    prompts = [([self.prefix_token_id] + self.tok_encode(chunk[j].args[0]))[-keep:] for j in members]
                    new = generate_batch(self.model, prompts, max_new,
                                         temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                                         top_k=int(kwargs.get("top_k", 0) or 0), top_p=float(kwargs.get("top_p", 1.0)),
                                         seed=int(kwargs.get("seed", 0) or 0), eos_id=self.eot_token_id,
                                         notify=None)
                    for j, ids in zip(members, new):
                        text = self.tok_decode(ids)
                        for stop in until:
                            if stop and stop in text:
                                text = text[:text.index(stop)]
                        texts[j] = text
                        self.cache_hook.add_partial("generate_until", chunk[j].args, text)
                out.extend(texts)  # type: ignore[arg-type]
            return out

    try:
        register_model("slam")(SLAMEvalLM)
    except (AssertionError, ValueError):
        pass  # already registered (a second build in the same process)
    return SLAMEvalLM


# ---------------------------------------------------------------------------------------------
# Running tasks.

def task_manager(include_path: Optional[list[str]] = None, include_defaults: bool = True):
    """lm-eval's TaskManager over its built-in tasks (indexing them takes ~10-20 s) and the task
    YAML folders ``include_path``."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).resolve()) for p in include_path or []]
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"--include-path {p!r} is not a directory of task YAML files")
    if not include_defaults and not paths:
        raise UserError("--no-default-tasks needs --include-path DIR: no task would be left")
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def check_tasks(tm: Any, tasks: list[str]) -> None:
    """UserError naming unknown tasks, with close matches."""
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        hint = "; ".join(f"{t!r}: did you mean {', '.join(h)}?" if h else f"{t!r}: no such task" for t, h in hints.items())
        raise UserError(f"--tasks: unknown task {hint} (lm-eval knows {len(known)} tasks and groups; "
                        "local ones need --include-path DIR)")


def evaluate(model: "torch.nn.Module", tokenizer: Any, tasks: list[str], *, limit: Optional[float] = None,
             include_path: Optional[list[str]] = None, include_defaults: bool = True, tm: Any = None,
             num_fewshot: Optional[int] = None, batch_size: int = 8, bootstrap_iters: int = 100000,
             seed: int = 1234) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on our model; returns its results dict (``results``, ``configs``,
    ``n-samples``, ...). ``tm``: a TaskManager already built (else one from include_path /
    include_defaults). Unknown task names are a UserError listing close matches."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    tm = tm if tm is not None else task_manager(include_path, include_defaults)
    check_tasks(tm, tasks)
    lm = make_lm(model, tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # only on non-zero ranks of a distributed run
        raise UserError("lm-eval returned no results")
    return results


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """``{"task/metric": value}`` of every finite score (lm-eval's "acc,none" -> "acc"; another
    filter than "none" stays as a suffix, "exact_match_strict")."""
    scores = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name, _, filt = key.partition(",")
            if name.endswith("_stderr"):
                continue
            if filt and filt != "none":
                name = f"{name}_{filt}".replace("-", "_")
            if math.isfinite(float(value)):
                scores[f"{task}/{name}"] = float(value)
    return scores


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from lm_eval.utils import handle_non_serializable

    from data_pipeline.storage import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, default=handle_non_serializable, sort_keys=True) + "\n")


def log_to_mlflow(scores: dict[str, float], *, uri: str, run_id: Optional[str], experiment: str, step: int,
                  params: dict[str, Any], artifact: Optional[Path]) -> str:
    """Log ``eval/<task>/<metric>`` at ``step`` into run ``run_id`` (else a new run of ``experiment``);
    returns the run id."""
    import mlflow

    from slam_pretrain.redact import redact_uri

    mlflow.set_tracking_uri(uri)
    try:
        if run_id:
            run = mlflow.start_run(run_id=run_id)
        else:
            mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=f"eval-step{step}")
    except Exception as e:  # MlflowException, connection errors: the user's URI or run id
        raise UserError(f"MLflow at {redact_uri(uri)}: {str(e).strip().splitlines()[0][:200]}") from None
    with run:
        mlflow.log_metrics({f"eval/{k}": v for k, v in scores.items()}, step=max(step, 0))
        if not run_id:
            mlflow.log_params(params)
        if artifact is not None:
            mlflow.log_artifact(str(artifact), artifact_path="eval")
        return run.info.run_id


def eval_cli(args: argparse.Namespace) -> int:
    """``slam-pretrain eval``: print the table, write JSON, log to MLflow when asked."""
    require_lm_eval()
    from lm_eval.utils import make_table

    from slam_pretrain.downstream.export import load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty: name lm-eval tasks, e.g. --tasks hellaswag,lambada_openai")
    if args.limit is not None and not args.limit > 0:
        raise UserError(f"--limit {args.limit} is invalid: a number of examples per task (>= 1) or a fraction in (0, 1)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} is invalid: must be >= 1")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    tm = task_manager(args.include_path, include_defaults=not args.no_default_tasks)
    check_tasks(tm, tasks)  # before the (slow) model load
    model, tokenizer, meta = load_model(args.checkpoint, device=args.device)
    print(f"[eval] {meta['kind']} {meta['source']} (step {meta['step']}): {', '.join(tasks)}"
          f"{f', limit {limit}' if limit is not None else ''}", file=sys.stderr, flush=True)
    results = evaluate(model, tokenizer, tasks, limit=limit, tm=tm, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                       bootstrap_iters=args.bootstrap_iters)
    results["slam_pretrain"] = {"checkpoint": str(meta["source"]), "kind": meta["kind"], "step": meta["step"]}
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    out = Path(args.output) if args.output else None
    if out is not None:
        _write_json(out, results)
        print(f"[eval] wrote {out}", file=sys.stderr)
    if args.mlflow_uri:
        run_id = log_to_mlflow(flat_scores(results), uri=args.mlflow_uri, run_id=args.mlflow_run_id,
                               experiment=args.mlflow_experiment, step=int(meta["step"]),
                               params={"checkpoint": str(meta["source"]), "tasks": ",".join(tasks),
                                       "limit": str(limit), "num_fewshot": str(args.num_fewshot)},
                               artifact=out)
        print(f"[eval] logged {len(flat_scores(results))} scores to MLflow run {run_id}", file=sys.stderr)
    return 0


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``eval`` subcommand's arguments (cli.py calls this)."""
    p = sub.add_parser("eval", help="score a checkpoint or an export on lm-evaluation-harness tasks")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run out_dir, or .safetensors export")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names, e.g. hellaswag,piqa")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (an int), or a fraction of each task (< 1); default: all")
    p.add_argument("--output", default=None, help="write the results as JSON to this FILE")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of extra task YAML files (repeatable)")
    p.add_argument("--no-default-tasks", action="store_true",
                   help="only the tasks under --include-path (skips indexing lm-eval's built-in tasks, ~10-20 s)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for the stderr of non-mean metrics (0 = none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mlflow-uri", default=None, help="log the scores to this MLflow tracking URI")
    p.add_argument("--mlflow-run-id", default=None, help="into this existing run (e.g. the training run)")
    p.add_argument("--mlflow-experiment", default="slam-eval", help="else into a new run of this experiment")
    return p
