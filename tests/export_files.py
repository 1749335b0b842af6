"""Files that are not dkm_kernels exports, shared by the loading and the command-line tests."""
import os

import torch
import torch.nn as nn

from dkm_kernels import compress_model
from dkm_kernels.export import FORMAT

# Enough random bytes that no reader mistakes them for a short valid header.
RANDOM_FILE_BYTES = 4096


def save_small_export(path):
    """A valid export of a two-layer model (layers "0" and "2", 3-bit palettes)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    compress_model(model, bits=3, skip_first_last=False, small_layer_threshold=0,
                   tau=1e-3).save_compressed(path)


def save_truncated_export(path):
    save_small_export(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# (case, write(path), what the ValueError says after "not a dkm_kernels export")
NOT_EXPORTS = [
    ("random bytes", lambda path: path.write_bytes(os.urandom(RANDOM_FILE_BYTES)),
     "cannot read it"),
    ("empty file", lambda path: path.write_bytes(b""), "cannot read it"),
    ("truncated export", save_truncated_export, "cannot read it"),
    ("plain state dict", lambda path: torch.save(nn.Linear(2, 2).state_dict(), path),
     "no 'format' field.*plain state dict"),
    ("a list", lambda path: torch.save([1, 2], path), "it holds a list"),
    ("another format", lambda path: torch.save({"format": "other/1"}, path),
     f"field 'format' is 'other/1', expected '{FORMAT}'"),
]
