"""The tied-weight model shared by the reliability and the export tests."""
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
