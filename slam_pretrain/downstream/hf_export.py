"""Export to a Hugging Face model folder (``slam-pretrain export --format hf --out DIR``).

``export_hf(checkpoint, out)`` writes, into a temporary sibling of ``out`` that is renamed into
place when complete (so ``out`` is either absent, the previous export, or the new one):

    config.json              model_type "slam", our ModelConfig fields (rope_scaling is
                             rope_scaling_factor), auto_map -> configuration_slam / modeling_slam
    configuration_slam.py    copied from slam_pretrain/downstream/hf/ (torch + transformers only)
    modeling_slam.py
    model.safetensors        fp32 weights under our own parameter names (a tied lm_head once)
    generation_config.json   eos/pad/bos ids; use_cache false for fractional layouts
    tokenizer.model          the SentencePiece model the run trained with
    tokenizer.json + tokenizer_config.json
                             BPE: the tokenizers-library equivalent (fast, no remote code),
                             checked against SentencePiece on a probe text at export time;
                             unigram (or a failed check): tokenization_slam.py, which calls
                             SentencePiece itself (auto_map AutoTokenizer)
    slam_pretrain.json       provenance: format, source, step, tokenizer sha256, tokenizer kind

An existing non-empty ``out`` is refused in one line unless it is a previous export (it holds
``slam_pretrain.json``), which is replaced. Needs the ``hf`` extra (transformers).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from data_pipeline.storage import atomic_dir
from slam_pretrain.errors import UserError
from slam_pretrain.downstream.export import load_model

HF_EXPORT_FORMAT = "slam-pretrain-hf-v1"
MARKER = "slam_pretrain.json"
TEMPLATES = Path(__file__).resolve().parent / "hf"
TIED = {"lm_head.weight": "tok_emb.weight"}
# Text the fast tokenizer must encode exactly as SentencePiece does before it is shipped.
PROBE_TEXT = (
    "def main(argv: list[str]) -> int:\n    \"\"\"Parse  the\targuments.\"\"\"\n\n\n    return 0  # done\r\n"
    "The quick brown fox jumps over the lazy dog; 3.14159 != 2.71828, 1234567890.\n"
    "Ünïcödé façade naïve — 日本語のテキスト, 中文, Ελληνικά, русский, emoji 🎉🚀, \u00a0nbsp, ＡＢＣ, ﬁ.\n"
    "</s> <s> <pad> <unk> tokens in text are text.  trailing   "
)

PathLike = Union[str, os.PathLike]


def require_transformers() -> None:
    """UserError (one line) when the ``hf`` extra is not installed."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("--format hf needs the 'hf' extra (transformers): pip install -c constraints.txt "
                        "-e '.[hf]'") from None


def is_hf_export(path: PathLike) -> bool:
    """Whether ``path`` is a folder written by export_hf."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text()).get("format") == HF_EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def hf_config_dict(model_config: dict[str, Any]) -> dict[str, Any]:
    """Our ModelConfig as a dict -> SLAMConfig keyword arguments (rope_scaling renamed)."""
    d = dict(model_config)
    d["rope_scaling_factor"] = d.pop("rope_scaling")
    if d.pop("doc_masking", False):
        # modeling_slam.py does not mirror document masking: its logits would be another function.
        raise UserError("model.doc_masking=true: the Hugging Face export does not implement document masking "
                        "(its model would compute another function); use the safetensors export instead")
    d.pop("doc_position_reset", None)  # only meaningful with doc_masking
    d.pop("eos_id", None)  # the tokenizer's EOS id is eos_token_id
    return d


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file: --format hf writes a directory")
    if out.is_dir() and any(out.iterdir()) and not is_hf_export(out):
        raise UserError(f"--out {str(out)!r} exists and is not empty (and is not a previous hf export): "
                        "pass a new or empty directory")


def _fast_tokenizer(sp_bytes: bytes, specials: dict[str, str]):
    """The tokenizers-library BPE equivalent of a SentencePiece BPE model (None for unigram)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto.FromString(sp_bytes)
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        return None  # unigram: SentencePiece's float32 Viterbi cannot be matched exactly
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        return None
    # split_special_tokens: "</s>" in text is text, as in SentencePiece (control pieces never match text).
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True,
                                   clean_up_tokenization_spaces=False, padding_side="left", **specials)


def write_tokenizer(tokenizer: Any, out: Path, max_len: int) -> str:
    """Tokenizer files into ``out``; returns "fast" (tokenizer.json) or "sentencepiece" (remote code)."""
    sp_bytes = tokenizer.model_bytes
    (out / "tokenizer.model").write_bytes(sp_bytes)
    specials = {name: tokenizer.id_to_piece(i) for name, i in (
        ("unk_token", tokenizer.unk_id), ("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
        ("pad_token", tokenizer.pad_id)) if i is not None and i >= 0}
    fast = _fast_tokenizer(sp_bytes, specials)
    if fast is not None and fast(PROBE_TEXT, add_special_tokens=False)["input_ids"] == tokenizer.encode(PROBE_TEXT):
        fast.model_max_length = max_len  # after the probe, which is longer
        fast.save_pretrained(str(out))
        return "fast"
    shutil.copyfile(TEMPLATES / "tokenization_slam.py", out / "tokenization_slam.py")
    config = {"tokenizer_class": "SLAMTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_slam.SLAMTokenizer", None]},
              "model_max_length": max_len, "padding_side": "left", "clean_up_tokenization_spaces": False,
              "split_special_tokens": True, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return "sentencepiece"


def write_hf_folder(model: torch.nn.Module, tokenizer: Any, model_config: dict[str, Any], out: Path,
                    provenance: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Every file of the export into the existing empty folder ``out`` (no atomicity here);
    returns what slam_pretrain.json records."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from slam_pretrain.downstream.hf.configuration_slam import SLAMConfig

    cfg = SLAMConfig(**hf_config_dict(model_config), pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                     eos_token_id=tokenizer.eos_id)
    cfg.architectures = ["SLAMForCausalLM"]
    cfg.auto_map = {"AutoConfig": "configuration_slam.SLAMConfig",
                    "AutoModelForCausalLM": "modeling_slam.SLAMForCausalLM"}
    cfg.dtype = "float32"
    cfg.save_pretrained(str(out))
    for name in ("configuration_slam.py", "modeling_slam.py"):
        shutil.copyfile(TEMPLATES / name, out / name)
    GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                     use_cache=cfg.use_cache).save_pretrained(str(out))

    tied = TIED if model_config.get("tie_embeddings") else {}
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
          if k not in tied}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    kind = write_tokenizer(tokenizer, out, int(model_config["max_seq_len"]))
    record = {"format": HF_EXPORT_FORMAT, "tokenizer": kind, "tokenizer_sha256": tokenizer.sha256,
              **(provenance or {})}
    (out / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def export_hf(checkpoint: PathLike, out: PathLike, notify: Optional[Callable[[str], None]] = None) -> Path:
    """Write the Hugging Face folder ``out`` from a checkpoint dir, a run out_dir or a .safetensors
    export. Returns ``out``."""
    require_transformers()
    out = Path(out)
    _check_out(out)
    model, tokenizer, meta = load_model(checkpoint)
    hf_config_dict(meta["model_config"])  # refuses what the export cannot mirror, before anything is written
    provenance = {"kind": meta.get("kind"), "source": str(meta.get("source")), "step": meta.get("step")}
    out.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> dict[str, Any]:
        record = write_hf_folder(model, tokenizer, meta["model_config"], tmp, provenance)
        _check_out(out)  # again: something may have appeared meanwhile
        return record

    record = atomic_dir(out, build)
    if notify and record["tokenizer"] == "sentencepiece":
        notify("[export] the tokenizer is SentencePiece unigram (or its tokenizers-library form did not match it "
               "exactly): the export ships tokenization_slam.py, which needs the sentencepiece package")
    return out
