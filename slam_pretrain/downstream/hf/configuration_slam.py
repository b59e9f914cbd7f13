"""SLAM v1 causal language model: the Hugging Face configuration (written by `slam-pretrain export --format hf`).

Self-contained: this file and ``modeling_slam.py`` are copied next to the weights, and
``AutoConfig.from_pretrained(DIR, trust_remote_code=True)`` loads them. The fields are those of
slam-pretrain's ``ModelConfig`` (same names and meaning), except ``rope_scaling``, which is
``rope_scaling_factor`` here because ``PretrainedConfig`` reserves ``rope_scaling`` for its own
RoPE dictionaries (``rope_scaling_type``, ``rope_original_max_len`` and ``rope_yarn_*`` keep their
names). ``segment_len``/``overlap`` are tokens (ints) or fractions of the sequence
length (floats in (0, 1]), exactly as in training.
"""

from __future__ import annotations

from typing import Optional, Union

from transformers import PretrainedConfig


class SLAMConfig(PretrainedConfig):
    model_type = "slam"
    # Names other libraries read (lm-evaluation-harness reads max_position_embeddings, vLLM-style
    # tools hidden_size / num_attention_heads / num_key_value_heads).
    attribute_map = {
        "hidden_size": "d_model",
        "max_position_embeddings": "max_seq_len",
        "num_attention_heads": "num_heads",
        "intermediate_size": "d_ff",
        "rms_norm_eps": "norm_eps",
    }

    def __init__(
        self,
        vocab_size: int = 8192,
        max_seq_len: int = 1024,
        d_model: int = 512,
        num_heads: int = 8,
        num_kv_heads: Optional[int] = None,
        d_ff: int = 1536,
        ef_cycles: int = 3,
        segment_len: Union[int, float] = 256,
        overlap: Union[int, float] = 64,
        dropout: float = 0.0,
        norm: str = "rmsnorm",
        norm_position: str = "pre",
        ffn: str = "swiglu",
        pos_encoding: str = "rope",
        rope_theta: float = 10000.0,
        rope_scaling_factor: float = 1.0,
        rope_scaling_type: str = "linear",
        rope_original_max_len: Optional[int] = None,
        rope_yarn_beta_fast: float = 32.0,
        rope_yarn_beta_slow: float = 1.0,
        rope_yarn_attn_factor: Optional[float] = None,
        tie_embeddings: bool = True,
        init_std: float = 0.02,
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        layout_revision: int = 2,
        use_cache: bool = True,
        pad_token_id: Optional[int] = 0,
        bos_token_id: Optional[int] = 2,
        eos_token_id: Optional[int] = 3,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.d_ff = d_ff
        self.ef_cycles = ef_cycles
        self.segment_len = segment_len
        self.overlap = overlap
        self.dropout = dropout
        self.norm = norm
        self.norm_position = norm_position
        self.ffn = ffn
        self.pos_encoding = pos_encoding
        self.rope_theta = rope_theta
        self.rope_scaling_factor = rope_scaling_factor
        # Context extension as in training: "linear" position interpolation or "yarn" (original
        # context length, ramp bounds beta_fast/beta_slow, attention factor; None = 0.1 ln(s) + 1).
        self.rope_scaling_type = rope_scaling_type
        self.rope_original_max_len = rope_original_max_len
        self.rope_yarn_beta_fast = rope_yarn_beta_fast
        self.rope_yarn_beta_slow = rope_yarn_beta_slow
        self.rope_yarn_attn_factor = rope_yarn_attn_factor
        self.tie_embeddings = tie_embeddings
        self.tie_word_embeddings = tie_embeddings
        self.init_std = init_std
        self.norm_eps = norm_eps
        self.qk_norm = qk_norm  # RMSNorm over head_dim of each head's q and k, before RoPE
        self.layout_revision = layout_revision
        # Fractional layouts move with N: no exact KV cache exists, so generation recomputes.
        self.use_cache = bool(use_cache) and not isinstance(segment_len, float)
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        kwargs.pop("tie_word_embeddings", None)
        super().__init__(**kwargs)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def num_hidden_layers(self) -> int:
        """Blocks in the model (initial, 2 per EF cycle, final); a token passes ef_cycles + 2."""
        return 2 + 2 * self.ef_cycles

    @property
    def fractional_segments(self) -> bool:
        return isinstance(self.segment_len, float)

    @property
    def prefix_consistent(self) -> bool:
        """logits(x[:, :n]) == logits(x)[:, :n] for every n: an exact KV cache exists."""
        return not self.fractional_segments
