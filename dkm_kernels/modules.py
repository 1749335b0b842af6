"""Which modules DKM clusters, and how their weights are read without running a parametrization.

The lowest layer of the model-level code: layer.py, compress.py, the snapping and export modules all
ask here, so that none of them has to import another for it.
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize

# A transposed convolution keeps its output channels on axis 1 of its weight (in, out / groups, ...).
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_TRANSPOSE_TYPES)
CLUSTERABLE_TYPES = (*CONV_TYPES, nn.Linear, nn.Embedding)


def raw_weight(module: nn.Module) -> Tensor | None:
    """The module's trainable weight, without running a parametrization on it."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module._parameters.get("weight")


def clusterable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and Embedding, in
    registration order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, CLUSTERABLE_TYPES) and raw_weight(module) is not None]


def layer_type(module: nn.Module) -> str:
    """'Conv2d', not the 'ParametrizedConv2d' class parametrize substitutes."""
    for cls in type(module).__mro__:
        if cls in CLUSTERABLE_TYPES:
            return cls.__name__
    return type(module).__name__
