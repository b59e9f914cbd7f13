"""The SLAM v1 causal LM (``slam_v1.py``, the whole model in one file) and its exact KV cache
(``kv_cache.py``). Knows nothing of engines, training or tracking.

``slam_pretrain.model`` is the public model API: the names below are re-exported from
``slam_v1.py``. The KV cache is imported from ``slam_pretrain.model.kv_cache`` (it sits on top of
the model, so importing the model does not load it).
"""

from slam_pretrain.model.slam_v1 import (LAYOUT_REVISION, PLAN_CACHE_SIZE, CausalSelfAttention, EFPlan, EncoderBlock,
                                         FeedForward, KVSlot, ModelConfig, SLAMv1LM, apply_rope, build_ef_plan,
                                         count_params, ef_segments, flops_per_token, make_norm, model_summary,
                                         rope_freqs)

__all__ = ["LAYOUT_REVISION", "PLAN_CACHE_SIZE", "CausalSelfAttention", "EFPlan", "EncoderBlock", "FeedForward",
           "KVSlot", "ModelConfig", "SLAMv1LM", "apply_rope", "build_ef_plan", "count_params", "ef_segments",
           "flops_per_token", "make_norm", "model_summary", "rope_freqs"]
