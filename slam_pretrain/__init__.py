"""slam-pretrain: distributed pretraining for the SLAM v1 causal language model."""

__version__ = "0.1.0"
