"""Helpers for the export/generate, Hugging Face export and lm-eval tests: tokenizers trained at
test time and real checkpoints written by slam_pretrain's own engine and CheckpointManager (one
subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent

# Writes one checkpoint per config: a real engine (DeepSpeed ZeRO-1, fp32, world 1) trains two
# steps and the CheckpointManager saves step_00000002 with the tokenizer. Where a job names a probe
# file, the training process's own view of the weights also computes logits on random tokens and
# saves both there: what an export or a loaded checkpoint must reproduce.
MAKE_CHECKPOINTS = r'''
import json, sys, torch
from pathlib import Path
from slam_pretrain.config import config_from_dict
from slam_pretrain.training.checkpoint import CheckpointManager
from slam_pretrain.distributed import init_distributed
from slam_pretrain.engine import build_engine
from slam_pretrain.model import SLAMv1LM

tok, jobs = Path(sys.argv[1]), json.loads(sys.argv[2])
dist = None
for cfg_dict, probe in jobs:
    cfg = config_from_dict(cfg_dict)
    dist = dist or init_distributed(cfg.engine.device)
    torch.manual_seed(0)
    model = SLAMv1LM(cfg.model)
    engine = build_engine(cfg, model, dist)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(4, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), generator=g)
        engine.forward_backward(ids[:, :-1], ids[:, 1:])
        engine.optimizer_step(cfg.train.lr)
    ckpt = CheckpointManager(Path(cfg.run.out_dir), cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, dist)
    ckpt.save(2, engine, rank_state={"rng": torch.get_rng_state()}, trainer_state={"step": 2},
              config_yaml=cfg.to_yaml(), checksums={}, tokenizer_path=tok)
    if probe is not None:
        ref = SLAMv1LM(cfg.model)
        ref.load_state_dict(engine.full_state_dict())
        ref.eval()
        x = torch.randint(4, cfg.model.vocab_size, (2, cfg.data.seq_len), generator=g)
        with torch.no_grad():
            torch.save({"tokens": x, "logits": ref(x)}, probe)
'''


def train_tokenizer(path: Path, vocab_size: int, model_type: str = "bpe", extra: Optional[list[str]] = None) -> Path:
    """A SentencePiece tokenizer trained on a few stdlib modules, some non-ASCII text and ``extra``
    texts (< 2 s)."""
    from data_pipeline.tokenizer import train_sentencepiece, training_lines

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "bisect.py", "heapq.py", "argparse.py")]
    texts += extra or []
    texts.append("Ünïcödé façade naïve — 日本語のテキスト 中文 Ελληνικά русский\t\ttabs  and  spaces 12345 3.14159")
    blob = train_sentencepiece(list(training_lines(texts)), vocab_size=vocab_size, model_type=model_type,
                               num_threads=1)
    path.write_bytes(blob)
    return path


def make_checkpoints(tokenizer: Path, configs: list, probes: Optional[list[Optional[Path]]] = None) -> None:
    """Write a real checkpoint (run.out_dir/checkpoints/step_00000002) for each slam_pretrain Config;
    ``probes[i]``, where given, receives ``{"tokens", "logits"}`` of config i's trained weights."""
    probes = probes or [None] * len(configs)
    assert len(probes) == len(configs), (len(probes), len(configs))
    jobs = [[c.to_dict(), None if p is None else str(p)] for c, p in zip(configs, probes)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", MAKE_CHECKPOINTS, str(tokenizer), json.dumps(jobs)],
                       capture_output=True, text=True, env=env, cwd=tokenizer.parent, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def run_config(out_dir: Path, seq_len: int, **model):
    """A validated slam_pretrain Config for a tiny CPU run into out_dir."""
    from slam_pretrain.config import Config
    from slam_pretrain.model import ModelConfig

    cfg = Config()
    cfg.model = ModelConfig(**model)
    cfg.data.seq_len = seq_len
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 2
    cfg.engine.name, cfg.engine.zero_stage, cfg.engine.precision, cfg.engine.device = "deepspeed", 1, "fp32", "cpu"
    cfg.run.out_dir = str(out_dir)
    cfg.validate()
    return cfg
