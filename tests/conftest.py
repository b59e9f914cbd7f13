"""Shared fixtures: one tiny real dataset per test session (built by the shipped `prepare`)."""

from __future__ import annotations

import os

import pytest

from data_assets import shared_tiny_dataset

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    """~1 MB of stdlib text -> tokenizer (vocab 2048) -> rows of 129 tokens; returns manifest.json."""
    return shared_tiny_dataset(tmp_path_factory)
