"""After pretraining: what uses a trained model (Hugging Face export in hf_export.py with its
templates in hf/, lm-evaluation-harness evaluation, fine-tuning). Built on slam_pretrain's public
functions (export.load_model, model, kv_cache, generate); optional extras are imported lazily."""
