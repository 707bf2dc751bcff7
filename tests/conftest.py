import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


@pytest.fixture
def quickstart_recipe() -> Path:
    return RECIPES / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub or a wandb server.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
