"""Templates of the Hugging Face export (`slam-pretrain export --format hf`).

``configuration_slam.py``, ``modeling_slam.py`` and ``tokenization_slam.py`` are copied verbatim
into the export folder and loaded there by transformers (``trust_remote_code=True``); they import
torch, transformers and (the tokenizer) sentencepiece only, never slam_pretrain.
"""
