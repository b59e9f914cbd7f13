"""Metric sinks and performance arithmetic: console output, metrics.jsonl, MFU and peak FLOPs.

MFU = achieved model FLOPs / peak FLOPs, where model FLOPs per token come from
``slam_pretrain.model.flops_per_token`` (forward + backward, first principles) and the peak comes
from the table below (dense tensor-core numbers from vendor data sheets), or, on a CPU, from a
matmul measured on this machine at start-up (CPUs have no single data-sheet peak worth quoting):
the best of several timed runs, so one run slowed by a busy machine does not set it.
``train.peak_flops`` overrides both. A measured peak is only an estimate (the machine may have
been busier while it was measured than while training), so MFU against it is shown as ``~x%``,
and a figure above 100% is never reported (``mfu`` returns None: the peak was underestimated).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from data_pipeline.storage import atomic_write

# Dense peak FLOP/s per device by (name fragment, dtype). Sparse numbers are not used.
PEAK_FLOPS: dict[tuple[str, str], float] = {
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 67e12,
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 19.5e12,
    ("L40S", "bf16"): 362e12, ("L40S", "fp16"): 362e12, ("L40S", "fp32"): 91.6e12,
    ("A10", "bf16"): 125e12, ("A10", "fp16"): 125e12, ("A10", "fp32"): 31.2e12,
    ("V100", "fp16"): 125e12, ("V100", "fp32"): 15.7e12,
}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_matmul_flops(device: torch.device, precision: str = "fp32", n: int = 1024,
                         seconds: float = 0.3, runs: int = 5) -> float:
    """FLOP/s of an n x n x n matmul on ``device``: the measured peak for CPUs and unknown GPUs.

    The best of ``runs`` timed runs of ``seconds / runs`` each: a run slowed by another process
    (a shared CPU) would understate the peak and inflate every MFU figure after it.
    """
    dtype = _DTYPES[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    best = 0.0
    for _ in range(max(1, runs)):
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            if iters % 2 == 0:
                sync()
                if time.perf_counter() - t0 >= seconds / max(1, runs):
                    break
        best = max(best, 2.0 * n**3 * iters / (time.perf_counter() - t0))
    return best


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float, world_size: int = 1) -> Optional[float]:
    """Model FLOPs utilization in [0, 1], or None when the figure cannot be supported.

    Above 1 the peak was underestimated (a measured CPU peak taken while the machine was busy) or
    is wrong: no such figure is reported. ``peak_flops`` is per device.
    """
    if not peak_flops or peak_flops <= 0 or world_size < 1:
        return None
    value = tokens_per_s * flops_per_token / (peak_flops * world_size)
    return value if 0.0 <= value <= 1.0 else None


def peak_flops(device: torch.device, precision: str, override: Optional[float] = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if override:
        return float(override), "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (frag, dt), value in PEAK_FLOPS.items():
            if frag in name and dt == precision:
                return value, f"table: {frag} {dt}"
        return measure_matmul_flops(device, precision, n=4096), f"measured matmul on {name}"
    return measure_matmul_flops(device, precision), "measured matmul on this CPU"


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (GPU) or the process's resident memory (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import psutil

        return psutil.Process().memory_info().rss / 1e9
    except ImportError:  # pragma: no cover - psutil is a dependency
        return float("nan")


class JsonlSink:
    """Appends one JSON object per record to ``out_dir/metrics.jsonl`` (rank 0 only).

    On resume, records with ``step`` beyond the checkpoint's step (written by the killed attempt
    after its last checkpoint) are dropped first, so the file reads as one uninterrupted run.
    Besides metric records, ``write_event`` adds records that carry an ``"event"`` key (where a
    checkpoint branch starts); readers of metrics skip records that have one.
    """

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run (--resume never, or no checkpoint) starts a fresh file
        self._fh: TextIO = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=False) + "\n")
        self._fh.flush()

    def write_event(self, event: dict[str, Any]) -> None:
        """A record that is not a metric: ``{"event": KIND, "step": N, ...}``, e.g. the branch
        ``CheckpointManager.resume_point`` started (``{"event": "branch", "branch": 1, "step": 1000,
        "from": ".../step_00001000", "abandoned": ..., "abandoned_steps": [...]}``). It holds the
        step it happened at, so a later resume from that step or after keeps it."""
        if not isinstance(event.get("event"), str) or not isinstance(event.get("step"), int):
            raise ValueError(f"an event record needs a string 'event' and an int 'step': {event!r}")
        self.write(event)

    def close(self) -> None:
        self._fh.close()


def format_record(record: dict[str, Any]) -> str:
    """One human log line, e.g. ``step 120/300 | loss 4.1234 | lr 2.9e-03 | ...``."""
    parts = [f"step {record['step']}/{record.get('max_steps', '?')}"]
    if record.get("split") == "val":
        parts.append(f"val_loss {record['val_loss']:.4f}")
        if "val_ppl" in record:
            parts.append(f"val_ppl {record['val_ppl']:.2f}")
        if "val_acc" in record:  # a classifier (slam-pretrain finetune)
            parts.append(f"val_acc {record['val_acc']:.4f} | val_macro_f1 {record['val_macro_f1']:.4f}")
        return " | ".join(parts)
    parts.append(f"loss {record['loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"gnorm {record['grad_norm']:.3f}")
    parts.append(f"tok/s {record['tokens_per_s']:,.0f}")
    if record.get("mfu") is not None:
        approx = "~" if record.get("mfu_peak_measured") else ""  # against a measured peak: an estimate
        parts.append(f"mfu {approx}{100 * record['mfu']:.2f}%")
    parts.append(f"step {1000 * record['step_time_s']:.0f}ms")
    parts.append(f"data {1000 * record['data_wait_s']:.1f}ms")
    parts.append(f"mem {record['mem_gb']:.2f}GB")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    return " | ".join(parts)


class ConsoleSink:
    """A progress bar on a terminal, one plain line per logged step otherwise (SLURM logs)."""

    def __init__(self, max_steps: int, start_step: int, stream: TextIO = sys.stdout):
        self.stream = stream
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, dynamic_ncols=True, file=stream,
                            desc="train", unit="step")

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, record: dict[str, Any]) -> None:
        line = format_record(record)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
