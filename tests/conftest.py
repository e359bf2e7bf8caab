"""Shared fixtures: seeded RNG, small models, hypothesis settings.

`reference.py` (the independent torch implementation of the formats) and `strategies.py`
(hypothesis strategies) live next to this file and are importable from every test module.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Example counts come from one profile for every property test (no per-test counts), chosen with
# HYPOTHESIS_PROFILE: "diffulex" (the default run and CI), "quick" (a smoke run while editing),
# "thorough" (before a release or after touching a format: 25x the default).
# Native calls and model copies take a few ms each; hypothesis' 200 ms deadline is noise on 2 cores.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("diffulex", max_examples=40, **_common)
settings.register_profile("quick", max_examples=8, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "diffulex"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(1234)
    return 1234


class MLP(nn.Module):
    """Mostly Linear parameters (a LayerNorm and biases aside)."""

    def __init__(self, d_in: int = 64, d_hidden: int = 128, d_out: int = 32, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.norm = nn.LayerNorm(d_hidden)
        self.head = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x):
        return self.head(self.norm(self.fc2(self.act(self.fc1(x)))))


class TiedLM(nn.Module):
    """A toy language model whose output projection shares the embedding matrix."""

    def __init__(self, vocab: int = 50, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.body(self.embed(ids)))


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.conv(x).transpose(1, 2))


@pytest.fixture
def mlp() -> MLP:
    return MLP().eval()


@pytest.fixture
def make_mlp():
    def make(**kw) -> MLP:
        return MLP(**kw).eval()

    return make


@pytest.fixture
def tied_lm() -> TiedLM:
    return TiedLM().eval()


@pytest.fixture
def make_tied_lm():
    return lambda **kw: TiedLM(**kw).eval()


@pytest.fixture
def no_linear() -> NoLinear:
    return NoLinear().eval()


def state_snapshot(model: nn.Module) -> dict:
    """Deep copy of every parameter and buffer, for before/after comparisons."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, snapshot: dict) -> None:
    now = model.state_dict()
    assert set(now) == set(snapshot), f"state_dict keys changed: {set(now) ^ set(snapshot)}"
    for k, v in snapshot.items():
        assert now[k].dtype == v.dtype and now[k].shape == v.shape, k
        assert torch.equal(now[k], v), f"{k} changed"


@pytest.fixture
def snapshot():
    return state_snapshot


@pytest.fixture
def assert_unchanged():
    return assert_state_equal
