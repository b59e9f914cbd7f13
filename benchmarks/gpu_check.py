"""Helper of ``benchmarks/gpu_check.sh`` (run that script, not this file).

Subcommands, each called by the script:

  corpus   a synthetic corpus and a word-level Hugging Face tokenizer.json whose vocabulary is
           exactly ``model.vocab_size`` of the resolved config (32,768 for slam_1b), so the real
           ``slam-pretrain prepare`` can copy it (``data.tokenizer``) instead of training a
           SentencePiece model of that size on random text (slow, and it fails on too little text).
           Documents are random words drawn uniformly from the vocabulary: one word is one token.
  bare     the bare loop on the same model: ``bench_gpu.train_step_fn`` (SLAMv1LM built on the GPU,
           the engine's activation-checkpointing helper, fused AdamW, bf16 autocast, fp32 master
           weights) with ``micro_batch_size x seq_len`` random tokens per step, eager and with every
           block compiled in place as the engines do (``block.compile()``). On a CPU (the dry run)
           an equivalent loop in fp32. Per-step wall time after a device sync, the first steps skipped.
  trainer  runs one ``launch/local.sh ... slam-pretrain train`` command, watches ``metrics.jsonl``
           and, once the record of the last step is there (or the time is up), SIGKILLs the launcher
           and every process below it, so the final evaluation, checkpoint (~12-14 GB at 1B) and
           export are not paid for; then reads tokens/s, MFU and peak memory from ``metrics.jsonl``
           (records past the warm-up steps) and the MFU peak from the trainer's log.
  summary  the table and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
PEAK_LINE = re.compile(r"MFU peak: ([0-9.]+) TFLOP/s per device \((.*)\)")


def _load_cfg(config: str, sets: list[str]) -> Any:
    from slam_pretrain.config import load_config

    return load_config(config, sets)


def _write_json(path: str, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, p)


# ---------------------------------------------------------------------------------------------
# corpus

def cmd_corpus(args: argparse.Namespace) -> int:
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = _load_cfg(args.config, args.set)
    vocab, seq = cfg.model.vocab_size, cfg.data.seq_len
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    n_words = vocab - len(specials)
    words = [f"w{i}" for i in range(n_words)]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab, tok.get_vocab_size(with_added_tokens=True)
    tok.save(str(out / "tokenizer.json"))
    # Rows of seq+1 tokens stepping by seq; one EOS per document. Train rows wanted, plus the
    # validation share (whole documents) and a margin.
    train_tokens = (args.rows + 2) * seq + 1
    total = int(train_tokens / (1.0 - args.val_fraction) * 1.05) + args.doc_words
    rng = np.random.default_rng(args.seed)
    n_docs = max(4, math.ceil(total / (args.doc_words + 1)))
    arr = np.array(words, dtype=object)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            ids = rng.integers(0, n_words, size=args.doc_words)
            f.write(json.dumps({"text": " ".join(arr[ids])}) + "\n")
    print(f"corpus: {n_docs} documents x {args.doc_words} words (~{n_docs * (args.doc_words + 1):,} tokens, "
          f"{(out / 'corpus.jsonl').stat().st_size / 1e6:.1f} MB), word-level tokenizer of {vocab:,} tokens, "
          f"seq_len {seq}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# bare loop

def _blocks(model: Any) -> list[Any]:
    """The engines' compile units (slam_pretrain/engine/fsdp_engine.py blocks_of)."""
    return [model.initial_block, *model.ef_blocks_A, *model.ef_blocks_B, model.final_block]


def _cpu_step_fn(mcfg: Any, batch: int, seq: int, ac: str):
    """``bench_gpu.train_step_fn`` for the CPU dry run: fp32, no autocast, foreach AdamW."""
    import torch

    from slam_pretrain.engine.activation_checkpointing import apply_activation_checkpointing
    from slam_pretrain.model import SLAMv1LM

    torch.manual_seed(0)
    model = SLAMv1LM(mcfg)
    apply_activation_checkpointing(model, ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, mcfg.vocab_size, (batch, seq))
    y = torch.randint(0, mcfg.vocab_size, (batch, seq))

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def cmd_bare(args: argparse.Namespace) -> int:
    import gc

    import torch

    cfg = _load_cfg(args.config, args.set)
    mcfg, seq, batch = cfg.model, cfg.data.seq_len, cfg.train.micro_batch_size
    ac = cfg.engine.activation_checkpointing
    cuda = args.device == "cuda"
    if cuda:
        assert torch.cuda.is_available(), "bare loop: no CUDA device"
        if cfg.engine.precision != "bf16":
            raise SystemExit("bare loop: on CUDA only bf16 is implemented (bench_gpu.train_step_fn)")
        sys.path.insert(0, str(REPO / "benchmarks"))
        import bench_gpu  # noqa: E402  (reused as is: the same bare loop as benchmarks/RESULTS.md)

        make = bench_gpu.train_step_fn
        sync = torch.cuda.synchronize
    else:
        if cfg.engine.precision != "fp32":
            raise SystemExit("bare loop: on CPU only fp32 is implemented")
        make = _cpu_step_fn
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

        def sync() -> None:
            pass

    results = []
    for mode in args.compile:
        t_start = time.perf_counter()
        row: dict[str, Any] = {"name": f"bare-{mode}", "engine": "bare loop", "compile": mode == "on"}
        try:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model, opt, step = make(mcfg, batch, seq, ac)
            if mode == "on":
                for block in _blocks(model):
                    block.compile()  # in place, as the engines do
            times: list[float] = []
            deadline = math.inf  # --timeout counts from the end of the first step (compilation)
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t0)
                if len(times) == 1:
                    deadline = time.perf_counter() + args.timeout
                if time.perf_counter() > deadline and len(times) >= args.warmup + 3:
                    break
            measured = times[args.warmup:]
            if not measured:
                raise RuntimeError(f"no step after the {args.warmup} warm-up steps within {args.timeout:.0f} s")
            st = statistics.mean(measured)
            if cuda:
                mem = torch.cuda.max_memory_allocated() / 1e9
            else:
                import psutil

                mem = psutil.Process().memory_info().rss / 1e9
            row.update({"status": "ok", "steps": len(times), "measured_steps": len(measured),
                        "step_time_s": st, "step_time_median_s": statistics.median(measured),
                        "tokens_per_s": batch * seq / st, "peak_mem_gb": mem,
                        "first_step_s": times[0], "wall_s": time.perf_counter() - t_start})
            del model, opt, step
        except Exception as e:  # one mode failing (e.g. compile) must not lose the other
            first = str(e).splitlines()[0][:300] if str(e) else ""
            row.update({"status": "failed", "error": f"{type(e).__name__}: {first}",
                        "wall_s": time.perf_counter() - t_start})
        print(f"bare loop, compile {mode}: " + json.dumps(row), flush=True)
        results.append(row)
        # After each mode: a mode killed by the script's time limit keeps the ones before it.
        _write_json(args.json, {"runs": results, "batch": batch, "seq_len": seq,
                                "device_name": torch.cuda.get_device_name() if cuda else "cpu",
                                "torch": torch.__version__})
    return 0 if all(r["status"] == "ok" for r in results) else 1


# ---------------------------------------------------------------------------------------------
# trainer runs

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (torchrun starts its workers in new sessions, so a
    process-group kill would miss them)."""
    kids, out, todo = _children(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    for _ in range(20):
        pids = [p for p in _tree(proc.pid) if p != os.getpid()]
        if proc.poll() is not None:
            pids = [p for p in pids if p != proc.pid]
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _records(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "split" not in rec and "step" in rec:
            out.append(rec)
    return out


def cmd_trainer(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    metrics = Path(args.out_dir) / "metrics.jsonl"
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    row: dict[str, Any] = {"name": args.name, "engine": args.engine, "compile": args.compile == "on",
                           "log": str(log)}
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        how = "exited"
        try:
            while True:
                recs = _records(metrics)
                if recs and max(r["step"] for r in recs) >= args.steps:
                    how = "stopped after the last measured step"
                    break
                if proc.poll() is not None:
                    break
                if time.perf_counter() - t_start > args.timeout:
                    how = f"stopped at the {args.timeout:.0f} s time limit"
                    break
                time.sleep(0.5)
        finally:
            rc = proc.poll()
            _kill_tree(proc)
    wall = time.perf_counter() - t_start
    text = log.read_text(errors="replace")
    m = PEAK_LINE.search(text)
    recs = _records(metrics)
    row.update({"wall_s": wall, "how": how, "exit_code": rc, "logged_steps": max((r["step"] for r in recs), default=0)})
    if m:
        row["peak_flops"] = float(m.group(1)) * 1e12
        row["peak_source"] = m.group(2)
    measured = [r for r in recs if r["step"] > args.warmup]
    # Each record averages the window since the previous one: weight by its steps.
    prev = {id(r): (recs[i - 1]["step"] if i else 0) for i, r in enumerate(recs)}
    if measured:
        n = [r["step"] - prev[id(r)] for r in measured]
        st = sum(r["step_time_s"] * k for r, k in zip(measured, n)) / sum(n)
        reported = [r["mfu"] for r in measured if r.get("mfu") is not None]
        row.update({"status": "ok" if row["logged_steps"] >= args.steps else "partial",
                    "measured_steps": sum(n), "step_time_s": st,
                    "tokens_per_s": args.tokens_per_step / st / args.nproc,  # per device
                    "trainer_mfu_reported": statistics.mean(reported) if reported else None,
                    "peak_mem_gb": max(r["mem_gb"] for r in recs if r.get("mem_gb") is not None),
                    "data_wait_s": statistics.mean(r.get("data_wait_s") or 0.0 for r in measured),
                    "losses": [r["loss"] for r in recs],
                    # (tokens/s over all ranks, the trainer's MFU): the exact peak it used, whatever the log rounds
                    "tokens_per_s_and_mfu": [[r["tokens_per_s"], r["mfu"]] for r in recs if r.get("mfu")]})
    else:
        tail = [ln for ln in text.splitlines() if ln.strip()][-15:]
        row.update({"status": "failed", "error": f"no metrics past step {args.warmup} ({how}, exit code {rc})",
                    "log_tail": tail})
    _write_json(args.json, row)
    brief = {k: row.get(k) for k in ("name", "status", "how", "wall_s", "tokens_per_s", "peak_mem_gb",
                                     "trainer_mfu_reported")}
    print(f"{args.name}: " + json.dumps(brief), flush=True)
    if row["status"] == "failed":
        print("\n".join("   | " + ln for ln in row["log_tail"]), flush=True)
    return 0 if row["status"] != "failed" else 1


# ---------------------------------------------------------------------------------------------
# summary

def _fmt(x: Optional[float], spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def cmd_summary(args: argparse.Namespace) -> int:
    from slam_pretrain.model import count_params, flops_per_token

    cfg = _load_cfg(args.config, args.set)
    seq = cfg.data.seq_len
    fpt = flops_per_token(cfg.model, seq)
    res = Path(args.results)
    bare_file = res / "bare.json"
    bare = json.loads(bare_file.read_text()) if bare_file.is_file() else {"runs": []}
    runs: list[dict[str, Any]] = []
    for name in args.runs:
        f = res / f"{name}.json"
        if f.is_file():
            runs.append(json.loads(f.read_text()))
        else:
            engine, _, mode = name.rpartition("-compile-")
            runs.append({"name": name, "engine": engine, "compile": mode == "on", "status": "failed",
                         "error": "no result (see the script's output)"})
    skipped = {}
    if (res / "skipped.tsv").is_file():  # written by the script: NAME<TAB>why
        for line in (res / "skipped.tsv").read_text().splitlines():
            if "\t" in line:
                k, why = line.split("\t", 1)
                skipped[k] = why
    for r in runs:
        if r["name"] in skipped:
            r.update({"status": "skipped", "error": skipped[r["name"]]})
    # The trainer's peak (its "MFU peak:" line, made exact from a metrics record where there is one).
    peak, peak_src = None, None
    for r in runs:
        if r.get("peak_flops"):
            peak, peak_src = r["peak_flops"], r["peak_source"]
            if r.get("tokens_per_s_and_mfu"):
                tps, m = r["tokens_per_s_and_mfu"][0]
                peak = tps * fpt / (m * args.nproc)
            break
    if peak is None and args.device == "cuda":
        from slam_pretrain.training.metrics import peak_flops as _pf  # the trainer's own table

        import torch

        peak, peak_src = _pf(torch.device("cuda"), cfg.engine.precision)
    for mode in args.bare_modes:  # a mode the bare process skipped or never finished (time limit, crash)
        name = f"bare-{mode}"
        if not any(r["compile"] == (mode == "on") for r in bare["runs"]):
            row = {"name": name, "engine": "bare loop", "compile": mode == "on", "status": "failed",
                   "error": "did not finish (time limit or crash: see bare.log)"}
            if name in skipped:
                row.update({"status": "skipped", "error": skipped[name]})
            bare["runs"].append(row)
    bare["runs"].sort(key=lambda r: r["compile"])
    bare_by_compile = {r["compile"]: r for r in bare["runs"] if r.get("status") == "ok"}
    rows = []
    for r in [*bare["runs"], *runs]:
        tps = r.get("tokens_per_s") if r.get("status") in ("ok", "partial") else None
        mfu = tps * fpt / peak if (tps and peak) else None
        ref = bare_by_compile.get(r.get("compile"))
        ratio = tps / ref["tokens_per_s"] if (tps and ref and r["engine"] != "bare loop") else None
        rows.append({**{k: v for k, v in r.items() if k not in ("losses", "log_tail", "tokens_per_s_and_mfu")},
                     "mfu": mfu,
                     "ratio_to_bare": ratio})
    trainer_rows = [x for x in rows if x["engine"] != "bare loop"]
    ok = [x for x in trainer_rows if x["mfu"] is not None or x.get("tokens_per_s")]
    aims = {
        "trainer_vs_bare_min": 0.97,
        "mfu_min": 0.45,
        "ratio_met": ({x["name"]: x["ratio_to_bare"] >= 0.97 for x in trainer_rows if x["ratio_to_bare"] is not None}),
        "mfu_met": ({x["name"]: x["mfu"] >= 0.45 for x in trainer_rows if x["mfu"] is not None}
                    if args.device == "cuda" else "n/a: the MFU aim is against the GPU data-sheet peak"),
    }
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run,
           "device": bare.get("device_name") or args.device, "torch": bare.get("torch"), "config": args.config,
           "overrides": args.set, "params": count_params(cfg.model), "seq_len": seq,
           "micro_batch_size": cfg.train.micro_batch_size, "nproc": args.nproc,
           "precision": cfg.engine.precision, "activation_checkpointing": cfg.engine.activation_checkpointing,
           "flops_per_token": fpt, "peak_flops": peak, "peak_source": peak_src, "runs": rows, "aims": aims,
           "elapsed_s": args.elapsed}
    _write_json(args.json, out)

    W = 100
    print("=" * W)
    print(f"gpu_check {'(DRY RUN, CPU) ' if args.dry_run else ''}{out['date']} | {out['device']} | "
          f"torch {out['torch']}")
    print(f"{args.config}: {out['params'] / 1e6:.1f}M params, {cfg.train.micro_batch_size} x {seq} tokens per "
          f"step per device, {cfg.engine.precision}, act. ckpt {cfg.engine.activation_checkpointing}, "
          f"{args.nproc} process(es)")
    peak_txt = (f"{peak / 1e12:.1f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.1f} GFLOP/s") if peak else ""
    print(f"MFU = tokens/s x {fpt / 1e9:.4g} GFLOP/token / "
          + (f"{peak_txt} ({peak_src})" if peak else "(no peak known)")
          + "; tokens/s per device, from the steps after the warm-up")
    print("-" * W)
    print(f"{'run':<22}{'compile':>8}{'tokens/s':>12}{'MFU':>8}{'peak mem GB':>13}{'vs bare':>9}  status")
    for x in rows:
        status = x["status"] if x["status"] in ("ok",) else f"{x['status']}: {x.get('error') or x.get('how', '')}"
        if x["status"] == "partial":
            status = f"partial ({x.get('measured_steps')} steps measured, {x.get('how')})"
        print(f"{x['name']:<22}{'on' if x.get('compile') else 'off':>8}{_fmt(x.get('tokens_per_s'), ',.0f'):>12}"
              f"{_fmt(x['mfu'], '.1%'):>8}{_fmt(x.get('peak_mem_gb'), '.2f'):>13}{_fmt(x['ratio_to_bare'], '.3f'):>9}"
              f"  {status}")
    print("-" * W)
    print("aims: trainer >= 0.97 of the bare loop: "
          + (", ".join(f"{k} {'MET' if v else 'MISSED'}" for k, v in aims["ratio_met"].items()) or "no figures"))
    if isinstance(aims["mfu_met"], dict):
        print("      MFU >= 45%: " + (", ".join(f"{k} {'MET' if v else 'MISSED'}" for k, v in aims["mfu_met"].items())
                                      or "no figures"))
    else:
        print(f"      MFU >= 45%: {aims['mfu_met']}")
    print(f"wall time {args.elapsed:.0f} s; JSON: {args.json}")
    print("=" * W)
    failed = [x["name"] for x in rows if x["status"] == "failed" or "time budget" in str(x.get("error", ""))]
    failed += [] if ok else ["(no trainer figures)"]
    if failed:
        print("incomplete: " + ", ".join(failed))
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd_name", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", required=True)
        sp.add_argument("--set", action="append", default=[])

    c = sub.add_parser("corpus")
    common(c)
    c.add_argument("--out", required=True)
    c.add_argument("--rows", type=int, required=True, help="training rows of seq_len+1 tokens wanted")
    c.add_argument("--val-fraction", type=float, default=0.05)
    c.add_argument("--doc-words", type=int, default=2000)
    c.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bare")
    common(b)
    b.add_argument("--device", required=True, choices=["cuda", "cpu"])
    b.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    b.add_argument("--steps", type=int, required=True)
    b.add_argument("--warmup", type=int, required=True)
    b.add_argument("--timeout", type=float, default=300.0,
                   help="per mode: stop stepping this long after the first step (at least warm-up + 3 steps)")
    b.add_argument("--json", required=True)

    t = sub.add_parser("trainer")
    t.add_argument("--name", required=True)
    t.add_argument("--engine", required=True)
    t.add_argument("--compile", required=True, choices=["off", "on"])
    t.add_argument("--out-dir", required=True)
    t.add_argument("--log", required=True)
    t.add_argument("--json", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--warmup", type=int, required=True)
    t.add_argument("--tokens-per-step", type=int, required=True, help="global batch x seq_len")
    t.add_argument("--nproc", type=int, default=1)
    t.add_argument("--timeout", type=float, required=True)
    t.add_argument("cmd", nargs=argparse.REMAINDER)

    s = sub.add_parser("summary")
    common(s)
    s.add_argument("--results", required=True)
    s.add_argument("--runs", nargs="*", default=[])
    s.add_argument("--bare-modes", nargs="*", default=[], choices=["off", "on"])
    s.add_argument("--device", required=True)
    s.add_argument("--nproc", type=int, default=1)
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--elapsed", type=float, default=0.0)
    s.add_argument("--json", required=True)

    args = p.parse_args(argv)
    return {"corpus": cmd_corpus, "bare": cmd_bare, "trainer": cmd_trainer, "summary": cmd_summary}[args.cmd_name](args)


if __name__ == "__main__":
    raise SystemExit(main())
