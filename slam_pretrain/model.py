"""SLAM v1 as a causal language model (contract: shared/spec/slam_model.md).

tokens[B, N] -> embedding -> initial_block (full causal attention + FFN)
             -> EF cycle 1..ef_cycles (ef_blocks_A[i] on even segments, ef_blocks_B[i] on odd ones,
                fused by the mean over the segments that hold a position)
             -> final_block -> final norm -> LM head -> logits[B, N, vocab]

This file holds no distributed code: engines apply sharding, activation checkpointing and
compile from outside (see slam_pretrain/engine/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from slam_pretrain.errors import ConfigError


@dataclass
class ModelConfig:
    """Hyper-parameters of SLAMv1LM. Names follow the seed where it has them."""

    vocab_size: int = 8192
    max_seq_len: int = 1024
    d_model: int = 512
    num_heads: int = 8
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = num_heads (plain MHA)
    d_ff: int = 1536
    ef_cycles: int = 3
    # Segment length and overlap of the EF cycles: an int is tokens, a float in (0, 1] a fraction
    # of the sequence length N (the prototype's preset is 0.6 / 0.2).
    segment_len: Union[int, float] = 256
    overlap: Union[int, float] = 64
    dropout: float = 0.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_position: Literal["pre", "post"] = "pre"
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    pos_encoding: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation factor for context extension
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-5

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def validate(self, prefix: str = "model") -> None:
        """Raise ConfigError naming the key, the value and what is valid."""

        def bad(key: str, value: object, valid: str) -> ConfigError:
            return ConfigError(f"{prefix}.{key}={value!r} is invalid: {valid}")

        for key in ("vocab_size", "max_seq_len", "d_model", "num_heads", "d_ff", "ef_cycles"):
            v = getattr(self, key)
            if v <= 0:
                raise bad(key, v, "must be a positive integer")
        if self.num_kv_heads is not None and self.num_kv_heads <= 0:
            raise bad("num_kv_heads", self.num_kv_heads, "must be a positive integer or null")
        if self.d_model % self.num_heads:
            raise bad("d_model", self.d_model, f"must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise bad("num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise bad("d_model", self.d_model, "d_model/num_heads must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", self.dropout, "must be in [0, 1)")
        if self.rope_theta <= 0 or self.rope_scaling <= 0:
            key = "rope_theta" if self.rope_theta <= 0 else "rope_scaling"
            raise bad(key, getattr(self, key), "must be positive")
        if self.init_std <= 0 or self.norm_eps <= 0:
            key = "init_std" if self.init_std <= 0 else "norm_eps"
            raise bad(key, getattr(self, key), "must be positive")
        seg, ov = self.segment_len, self.overlap
        if isinstance(seg, float):
            if not 0.0 < seg <= 1.0:
                raise bad("segment_len", seg, "a fraction must be in (0, 1]; use an int for tokens")
            if not (isinstance(ov, float) or ov == 0):
                raise bad("overlap", ov, "must be a fraction too when segment_len is a fraction")
        else:
            if seg <= 0:
                raise bad("segment_len", seg, "must be a positive number of tokens")
            if isinstance(ov, float) and ov != 0:
                raise bad("overlap", ov, "must be tokens (an int) when segment_len is tokens")
        if ov < 0 or ov >= seg / 2:
            raise bad("overlap", ov, f"must satisfy 0 <= overlap < segment_len/2 = {seg / 2:g}")
