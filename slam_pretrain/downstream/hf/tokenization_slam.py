"""SLAM's SentencePiece tokenizer for Hugging Face transformers (written by `slam-pretrain export --format hf`).

Used when the export cannot ship an exact ``tokenizer.json`` (unigram models: SentencePiece's
float32 Viterbi and the tokenizers library's can pick different pieces deep into long texts).
It calls SentencePiece itself on ``tokenizer.model``, so ids are the training tokenizer's exactly:
no BOS/EOS added, no dummy prefix, byte fallback, and text that spells a special token
("</s>") is plain text, as in training.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class SLAMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, unk_token: str = "<unk>", bos_token: str = "<s>", eos_token: str = "</s>",
                 pad_token: str = "<pad>", **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(vocab_file)
        kwargs["split_special_tokens"] = True  # special pieces never come from text, as in SentencePiece
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode([self.sp.piece_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """SentencePiece's decoding; special tokens are written out unless ``skip_special_tokens``
        (like transformers' other tokenizers; SentencePiece alone drops them)."""
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        special = set(self.all_special_ids)
        parts, run = [], []
        for i in ids:
            if i in special:
                if not skip_special_tokens:
                    parts.append(self.sp.decode(run))
                    parts.append(self.sp.id_to_piece(i))
                    run = []
            else:
                run.append(i)
        return "".join(parts) + self.sp.decode(run)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: Optional[list[int]] = None):
        return list(token_ids_0) + (list(token_ids_1) if token_ids_1 else [])

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens: bool = False):
        return [0] * (len(token_ids_0) + (len(token_ids_1) if token_ids_1 else 0))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 0

    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> tuple[str]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
