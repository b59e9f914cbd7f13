"""Tokenizers: SentencePiece training on a sample of lines, and the small wrapper everyone uses.

Training settings give lossless round trips (``decode(encode(s)) == s``): identity
normalization, no extra-whitespace removal, no dummy prefix, ``byte_fallback`` for anything
outside the vocabulary. Fixed ids: pad=0, unk=1, bos=2, eos=3. BOS/EOS are never added by
``encode``; the packer appends EOS after every document.

``Tokenizer`` also wraps an existing tokenizer (``data.tokenizer``): a SentencePiece model (its
own special ids; pad may be absent) or a Hugging Face ``tokenizer.json`` (the ``tokenizers``
library). Which one is decided from the bytes (a JSON object is a tokenizer.json), so a copy under
any name (a checkpoint's ``tokenizer.model``) loads the same way. In a tokenizer.json the special
tokens are found by name among its special added tokens (``HF_SPECIAL_NAMES``); special-token text
inside a document is encoded as plain text, never as the special id.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Union

import sentencepiece as spm

from data_pipeline.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Names of special tokens in a Hugging Face tokenizer.json, by role, most common first.
HF_SPECIAL_NAMES = {
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[BOS]"),
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}
# SentencePiece silently drops training sentences longer than max_sentence_length bytes, so the
# sample is cut into lines and long lines into chunks of at most this many characters (<= 4 bytes
# each in UTF-8, under the 16 KiB limit set below).
MAX_TRAIN_CHARS = 4096


def is_hf_json(model_bytes: bytes) -> bool:
    """A Hugging Face tokenizer.json (a JSON object), not a SentencePiece protobuf."""
    return model_bytes.lstrip()[:1] == b"{"


class Tokenizer:
    """``Tokenizer(path)``: encode/decode with a SentencePiece model or a Hugging Face tokenizer.json.

    ``pad_id``, ``bos_id``, ``unk_id`` are -1 when the tokenizer has no such token; ``eos_id`` too,
    which ``prepare`` refuses (documents are separated by EOS).
    """

    def __init__(self, path: Union[str, os.PathLike, None] = None, *, model_bytes: bytes | None = None):
        if model_bytes is None:
            if path is None:
                raise ValueError("Tokenizer needs a path or model_bytes")
            p = Path(path)
            try:
                model_bytes = p.read_bytes()
            except OSError as e:
                raise DataError(f"tokenizer {str(p)!r} cannot be read ({e.strerror or e}); "
                                "run `slam-pretrain prepare` first") from None
        self.path = Path(path) if path is not None else None
        self.model_bytes = model_bytes
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._sp = self._hf = None
        self.kind = "hf" if is_hf_json(model_bytes) else "sentencepiece"
        if self.kind == "hf":
            self._load_hf(model_bytes, path)
            return
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise DataError(f"tokenizer {str(path or '<bytes>')!r} is not a SentencePiece model ({e})") from None
        self._ids = {"pad": self._sp.pad_id(), "unk": self._sp.unk_id(), "bos": self._sp.bos_id(),
                     "eos": self._sp.eos_id()}

    def _load_hf(self, model_bytes: bytes, path: object) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise DataError(f"tokenizer {str(path or '<bytes>')!r} is a Hugging Face tokenizer.json: it needs the "
                            "'tokenizers' package (pip install -c constraints.txt tokenizers)") from None
        try:
            self._hf = HFTokenizer.from_str(model_bytes.decode("utf-8"))
        except Exception as e:  # invalid JSON or an unknown model: one line
            msg = " ".join(str(e).split())[:200]
            raise DataError(f"tokenizer {str(path or '<bytes>')!r} is not a valid Hugging Face tokenizer.json "
                            f"({msg})") from None
        self._hf.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not the EOS id
        self._hf.no_padding()
        self._hf.no_truncation()
        special = {t.content: i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
        self._ids = {role: next((special[n] for n in names if n in special), -1)
                     for role, names in HF_SPECIAL_NAMES.items()}

    @property
    def model_type(self) -> str:
        """'sentencepiece', or the Hugging Face model class (BPE, Unigram, WordPiece, ...)."""
        return type(self._hf.model).__name__ if self._hf is not None else "sentencepiece"

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS)."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1, add_eos: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded in ``num_threads`` native threads (GIL released).

        A Hugging Face tokenizer uses its own thread pool (``RAYON_NUM_THREADS``) instead."""
        if self._hf is not None:
            out = [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]
            if add_eos:
                for ids in out:
                    ids.append(self.eos_id)
            return out
        return self._sp.encode(texts, add_eos=add_eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad/bos/eos decode to nothing."""
        if self._hf is not None:
            return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        if self._hf is not None:
            return self._hf.id_to_token(int(i)) or ""
        return self._sp.id_to_piece(int(i))

    def __getstate__(self) -> dict:  # picklable: worker processes rebuild the processor
        return {"path": self.path, "model_bytes": self.model_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], model_bytes=state["model_bytes"])


def training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Split documents into non-empty lines of at most MAX_TRAIN_CHARS characters."""
    for text in texts:
        for line in text.split("\n"):
            for i in range(0, len(line), MAX_TRAIN_CHARS):
                chunk = line[i:i + MAX_TRAIN_CHARS]
                if chunk.strip():
                    yield chunk


def train_sentencepiece(lines: list[str], vocab_size: int, model_type: str, num_threads: int) -> bytes:
    """Train a model on ``lines``; returns the serialized model. DataError when it cannot."""
    if not lines:
        raise DataError("tokenizer training sample is empty: the corpus has no text")
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, model_type=model_type,
            vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_digits=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            max_sentence_length=4 * MAX_TRAIN_CHARS, input_sentence_size=0,
            num_threads=max(1, num_threads), minloglevel=2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        hint = ""
        if "Vocabulary size" in msg or "vocab_size" in msg:
            hint = " (lower model.vocab_size or raise data.tokenizer_sample_mb)"
        raise DataError(f"tokenizer training failed for model.vocab_size={vocab_size}: {msg}{hint}") from None
    return out.getvalue()
