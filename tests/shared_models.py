"""Models, and a check of their state, shared by several test modules."""
import torch
import torch.nn as nn


class TiedLM(nn.Module):
    """A small language model whose head shares the embedding's weight (`head.weight =
    emb.weight`, as real ones do); tie=False builds the same architecture untied."""

    def __init__(self, tie=True):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens))))


def seeded(model_cls, seed=0):
    """model_cls() built right after seeding torch's global generator: the same initial weights
    every time."""
    torch.manual_seed(seed)
    return model_cls()


def assert_same_state(state, expected):
    """Two state dicts hold the same keys and bit-identical tensors (the failing key is named)."""
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
