"""Shared test set-up: offline Hugging Face, and CUDA tests skipped where there is no GPU."""

from __future__ import annotations

import os

import pytest
import torch

# Third-party models are built from configs; nothing may reach for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run them with `python -m pytest -m cuda` on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
