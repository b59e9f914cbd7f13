"""SentencePiece tokenizer: training on a sample of lines, and the small wrapper everyone uses.

Training settings give lossless round trips (``decode(encode(s)) == s``): identity
normalization, no extra-whitespace removal, no dummy prefix, ``byte_fallback`` for anything
outside the vocabulary. Fixed ids: pad=0, unk=1, bos=2, eos=3. BOS/EOS are never added by
``encode``; the packer appends EOS after every document.
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
# SentencePiece silently drops training sentences longer than max_sentence_length bytes, so the
# sample is cut into lines and long lines into chunks of at most this many characters (<= 4 bytes
# each in UTF-8, under the 16 KiB limit set below).
MAX_TRAIN_CHARS = 4096


class Tokenizer:
    """``Tokenizer(path)``: encode/decode with a trained SentencePiece model file."""

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
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise DataError(f"tokenizer {str(path or '<bytes>')!r} is not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1, add_eos: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded in ``num_threads`` native threads (GIL released)."""
        return self._sp.encode(texts, add_eos=add_eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad/bos/eos decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
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
