"""Compression analysis: the per-layer summary table and byte formatting, importable as in the
public implementation: `from dkm_kernels.utils import print_compression_summary`."""
from __future__ import annotations

import sys

from .compress import parse_config, parse_model_config
from .info import export_bytes

__all__ = ["print_compression_summary", "format_bytes", "export_bytes", "parse_config",
           "parse_model_config"]

# Binary units: the "KB" printed is 1024 bytes.
BYTES_PER_KB = 1024
# Columns of the tables: layer names and types are cut to these widths.
NAME_WIDTH = 28
TYPE_WIDTH = 9


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < BYTES_PER_KB or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= BYTES_PER_KB
    return f"{count:.2f} GB"


def print_compression_summary(info: dict, file=None) -> None:
    """Print `DKMCompressor.get_compression_info()` as a table: one row per clustered layer,
    the layers left uncompressed, and the whole model's sizes and ratio."""
    out = file or sys.stdout
    header = (f"{'layer':<{NAME_WIDTH}} {'type':<{TYPE_WIDTH}} {'params':>9} {'b/d':>6} {'k':>6} "
              f"{'groups':>6} "
              f"{'bits/w':>7} {'size':>10} {'ratio':>7}")
    print("DKM compression summary", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for entry in info["layers"]:
        print(f"{entry['name'][:NAME_WIDTH]:<{NAME_WIDTH}} "
              f"{entry['type'][:TYPE_WIDTH]:<{TYPE_WIDTH}} {entry['params']:>9} "
              f"{entry['config']:>6} {entry['n_clusters']:>6} {entry['groups']:>6} "
              f"{entry['effective_bits_per_weight']:>7.3f} "
              f"{format_bytes(entry['compressed_bytes']):>10} {entry['compression_ratio']:>6.1f}x",
              file=out)
    for name, reason in info["skipped"].items():
        print(f"{name[:NAME_WIDTH]:<{NAME_WIDTH}} uncompressed ({reason})", file=out)
    print("-" * len(header), file=out)
    print(f"clustered parameters: {info['clustered_params']}; palettes in {info['lut_dtype']}; "
          f"other tensors kept as they are: {format_bytes(info['uncompressed_bytes'])}", file=out)
    print(f"model size: {format_bytes(info['original_bytes'])} -> "
          f"{format_bytes(info['compressed_bytes'])} "
          f"({info['compression_ratio']:.2f}x smaller)", file=out)
