"""Data pipeline: corpus -> SentencePiece -> packed WebDataset shards -> resumable loader.

The public names are imported lazily so that ``import data_pipeline.config`` (which the run
config does) stays cheap: ``build_loader`` pulls in torch only when it is used.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "DataError": "data_pipeline.errors",
    "DataConfig": "data_pipeline.config",
    "prepare_from_config": "data_pipeline.prepare",
    "build_loader": "data_pipeline.loader",
    "loader_kwargs": "data_pipeline.loader",
    "TokenLoader": "data_pipeline.loader",
    "Tokenizer": "data_pipeline.tokenizer",
    "load_manifest": "data_pipeline.manifest",
    "check_compatible": "data_pipeline.manifest",
    "Manifest": "data_pipeline.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
