"""Data pipeline: corpus -> SentencePiece -> packed WebDataset shards -> resumable loader."""
