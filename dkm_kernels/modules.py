"""Which modules DKM clusters, and how their weights are read without running a parametrization.

The lowest layer of the model-level code: layer.py, compress.py, the snapping and export modules all
ask here, so that none of them has to import another for it.

A registry maps module types to how they are clustered (`ClusterableType`): which per-kind config
of compress_model applies ("conv", "fc" or "embedding") and which axis of the weight holds the
output channels. torch.nn's Conv, ConvTranspose, Linear and Embedding are registered, and so is
GPT-2's `transformers.pytorch_utils.Conv1D` (a Linear whose weight is stored transposed, (in, out)),
by name, so that transformers is never imported here. `register_module_type` adds others.
"""
from __future__ import annotations

import dataclasses

from torch import Tensor, nn
from torch.nn.utils import parametrize

# A transposed convolution keeps its output channels on axis 1 of its weight (in, out / groups, ...).
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_TRANSPOSE_TYPES)
CLUSTERABLE_TYPES = (*CONV_TYPES, nn.Linear, nn.Embedding)
KINDS = ("conv", "fc", "embedding")


@dataclasses.dataclass(frozen=True)
class ClusterableType:
    """kind: the per-kind config that applies ("conv", "fc", "embedding"); output_axis: the axis
    of the weight that holds the output channels (group_size and per-channel scales follow axis
    0, so a type with another output axis is clustered with neither)."""

    kind: str
    output_axis: int = 0


# type, or "module.QualifiedName" for a class matched by name without importing its module.
_REGISTRY: dict[type | str, ClusterableType] = {
    **{cls: ClusterableType("conv") for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    **{cls: ClusterableType("conv", output_axis=1) for cls in CONV_TRANSPOSE_TYPES},
    nn.Linear: ClusterableType("fc"),
    nn.Embedding: ClusterableType("embedding"),
    # GPT-2, GPT, ...: y = x @ W + b with W (in_features, out_features).
    "transformers.pytorch_utils.Conv1D": ClusterableType("fc", output_axis=1),
}


def register_module_type(module_type: type | str, kind: str, output_axis: int = 0) -> None:
    """Make `module_type` (a class, or its "module.QualifiedName") clusterable: its `weight`
    Parameter is clustered with the config of `kind` ("conv", "fc" or "embedding"); output_axis is
    the weight's axis of output channels (0 for Linear's (out, in), 1 for a transposed layout)."""
    if not isinstance(module_type, (type, str)):
        raise TypeError(f"module_type must be a class or a 'module.QualifiedName' string, got "
                        f"{module_type!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(output_axis, bool) or not isinstance(output_axis, int) or output_axis < 0:
        raise ValueError(f"output_axis must be an integer >= 0, got {output_axis!r}")
    _REGISTRY[module_type] = ClusterableType(kind, output_axis)


def _registered_class(module: nn.Module) -> tuple[type, ClusterableType] | None:
    """The most derived registered class of `module` (parametrize's subclass is not registered,
    the class it derives from is) and its entry."""
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls) or _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return cls, entry
    return None


def clusterable_type(module: nn.Module) -> ClusterableType | None:
    """How `module` is clustered, or None when its type is not registered."""
    found = _registered_class(module)
    return None if found is None else found[1]


def raw_weight(module: nn.Module) -> Tensor | None:
    """The module's trainable weight, without running a parametrization on it."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module._parameters.get("weight")


def clusterable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of a registered type that has a weight, in registration
    order."""
    return [(name, module) for name, module in model.named_modules()
            if clusterable_type(module) is not None and raw_weight(module) is not None]


def layer_type(module: nn.Module) -> str:
    """'Conv2d', not the 'ParametrizedConv2d' class parametrize substitutes."""
    found = _registered_class(module)
    return type(module).__name__ if found is None else found[0].__name__
