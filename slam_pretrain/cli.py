"""``slam-pretrain`` command line: prepare, train, generate, export, eval, eval-long, finetune, classify, demo.

User mistakes (ConfigError, UserError, DataError, missing files, and OSErrors of writing: no
space, read-only, permission denied) become one line on stderr and exit code 2; nothing else in
the package calls ``sys.exit``. Heavy imports (DeepSpeed, MLflow, sentencepiece) happen inside
the subcommands; a config error costs only the torch import that
``ModelConfig``'s module brings (~1.5 s).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from slam_pretrain.errors import WRITE_ERRNOS, ConfigError, UserError, write_error

EXIT_USER_ERROR = 2


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file, e.g. configs/tiny_cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """What every training run takes (train, finetune): the config, where to resume from, and the
    --local_rank that the deepspeed launcher may pass after the subcommand."""
    _add_config_args(p)
    p.add_argument("--resume", default="auto",
                   help="'auto' (newest complete checkpoint in run.out_dir), 'never', or a checkpoint path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _load(args: argparse.Namespace):
    from slam_pretrain.config import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import parse_part, prepare_from_config

    part = parse_part(args.part) if args.part is not None else None
    cfg = _load(args)
    prepare_from_config(cfg.data, vocab_size=cfg.model.vocab_size, part=part, merge=args.merge)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.dry_run:
        from slam_pretrain.model import model_summary

        print(cfg.to_yaml(), end="")
        print("---")
        print(model_summary(cfg.model, cfg.data.seq_len))
        k = cfg.engine.context_parallel
        if k > 1:  # what each rank of a context group computes (model/sequence_shard.py)
            n = cfg.data.seq_len
            s, o = cfg.model.segment_layout(n)
            print(f"  context parallel {k}: each row in {2 * k} chunks of {n // (2 * k)} tokens, rank r computes "
                  f"chunks r and {2 * k - 1}-r ({n // k} tokens); EF halo {o} tokens per chunk edge")
        return 0
    from slam_pretrain.train_main import run_training

    return run_training(cfg, resume=args.resume)


def cmd_finetune(args: argparse.Namespace) -> int:
    from slam_pretrain.downstream.finetune import run_finetune

    return run_finetune(_load(args), init=args.init, resume=args.resume)


def cmd_classify(args: argparse.Namespace) -> int:
    from slam_pretrain.downstream.finetune import classify_cli

    return classify_cli(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from slam_pretrain.downstream.generate import generate_cli

    return generate_cli(args)


def cmd_export(args: argparse.Namespace) -> int:
    if getattr(args, "format", "safetensors") == "hf":
        from slam_pretrain.downstream.hf_export import export_hf

        out = export_hf(args.checkpoint, args.out, notify=lambda line: print(line, file=sys.stderr))
        print(f"wrote {out}/ (Hugging Face: AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))")
        return 0
    from slam_pretrain.downstream.export import export_checkpoint, export_paths

    weights, config, tokenizer = export_paths(export_checkpoint(args.checkpoint, args.out))
    print(f"wrote {weights} (+ {config.name}, {tokenizer.name})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slam_pretrain.downstream.lm_eval_adapter import eval_cli

    return eval_cli(args)


def cmd_eval_long(args: argparse.Namespace) -> int:
    from slam_pretrain.downstream.long_eval import eval_long_cli

    return eval_long_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from slam_pretrain.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slam-pretrain", description=__doc__.splitlines()[0])
    # The deepspeed launcher passes --local_rank=N before the script's own arguments.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="train the tokenizer and write packed WebDataset shards")
    _add_config_args(p)
    p.add_argument("--part", metavar="I/N", default=None,
                   help="encode only part I of N (0 <= I < N) into DATASET_DIR/parts/; then run --merge once")
    p.add_argument("--merge", action="store_true",
                   help="write the shards and manifest from the finished parts (names any missing part)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (or resume) a model")
    _add_run_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and model summary")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a checkpoint or an export")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run out_dir, or .safetensors export")
    p.add_argument("--input", required=True, help='prompt text, e.g. "Your input text here"')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (deterministic)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context for every token (the reference path; same tokens, slower)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("finetune", help="fine-tune a pretrained model for text classification")
    _add_run_args(p)
    p.add_argument("--init", required=True, help="the pretrained checkpoint dir, run out_dir or .safetensors export")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("classify", help="the label of a text, from a fine-tuned checkpoint")
    p.add_argument("--checkpoint", required=True, help="fine-tuning checkpoint dir or run out_dir")
    p.add_argument("--input", required=True, help='the text to classify, e.g. "Your input text here"')
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("export", help="consolidate a checkpoint into one safetensors file or a Hugging Face folder")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint dir (step_XXXXXXXX) or run out_dir (--format hf: also a .safetensors export)")
    p.add_argument("--out", required=True, help="output FILE.safetensors, or a directory with --format hf")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors (default): our own export; hf: a transformers folder (needs the 'hf' extra)")
    p.set_defaults(func=cmd_export)

    from slam_pretrain.downstream.lm_eval_adapter import add_eval_parser

    add_eval_parser(sub).set_defaults(func=cmd_eval)
    from slam_pretrain.downstream.long_eval import add_eval_long_parser

    add_eval_long_parser(sub).set_defaults(func=cmd_eval_long)

    p = sub.add_parser("demo", help="prepare the stdlib dataset, train the tiny model, generate")
    p.add_argument("--config", default="configs/tiny_cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConfigError, UserError, FileNotFoundError]
    try:
        from data_pipeline.errors import DataError

        types.append(DataError)
    except ImportError:
        pass
    return tuple(types)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_error_types() as e:
        print(f"slam-pretrain {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # a full disk or a read-only folder wherever it strikes: one line, not a traceback
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"slam-pretrain {args.command}: error: {write_error(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"slam-pretrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
