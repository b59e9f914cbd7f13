"""Training: the generic loop (``trainer.py``) and its small callbacks, checkpoints, metrics sinks
and MLflow tracking. Talks to an engine through its interface; knows no DeepSpeed/FSDP code."""
