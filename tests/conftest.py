"""Shared fixtures: tiny randomly initialised GPT-2 and Llama models built in the test."""

from __future__ import annotations

import pytest
import torch

from lensspace.adapter import Adapter
from lensspace.models import build_random_model

TINY = {
    "gpt2": {"arch": "gpt2", "n_layers": 3, "d_model": 32, "n_heads": 4, "seed": 3},
    "llama": {"arch": "llama", "n_layers": 3, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "seed": 4},
}


@pytest.fixture(params=sorted(TINY), scope="session")
def tiny(request):
    """(adapter, tokenizer) of a tiny random model, once per family."""
    model, tokenizer = build_random_model(TINY[request.param])
    model.requires_grad_(False)
    return Adapter(model), tokenizer


@pytest.fixture(scope="session")
def tiny_ids():
    return torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
