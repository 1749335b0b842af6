"""What capturing the op in a CUDA graph needs (docs/design.md §12): whether a capture is running,
and a cache for the small device constants the op builds from host values (tables, per-segment
scalars), which a captured graph reads at every replay."""
from __future__ import annotations

import collections
from typing import Callable

import torch


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False on a build without CUDA)."""
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # torch built without CUDA
        return False


class DeviceCache:
    """Values (device tensors, or tuples of them) by the host values they are built from: the
    `size` most recently used, and, for the life of the process, every one used while a graph was
    being captured (the graph reads their memory at each replay, and it must not be freed).
    Building copies host values to the device, which a capture cannot do: a key first seen under
    capture is an error that asks for a warm-up call."""

    def __init__(self, size: int):
        self.size = size
        self._recent: collections.OrderedDict = collections.OrderedDict()
        self._captured: dict = {}

    def get(self, key, build: Callable):
        value = self._captured.get(key)
        if value is not None:
            return value
        value = self._recent.get(key)
        if value is None:
            if capturing():
                raise RuntimeError(
                    "dkm_kernels builds its device tables on the first call with these weights, "
                    "shapes and options, and cannot copy them while a CUDA graph is captured: "
                    "run the same call once before capturing (torch.cuda.graph's warm-up)")
            value = self._recent[key] = build()
            if len(self._recent) > self.size:
                self._recent.popitem(last=False)
        self._recent.move_to_end(key)
        if capturing():
            self._captured[key] = value
        return value

    def clear(self) -> None:
        self._recent.clear()
        self._captured.clear()
