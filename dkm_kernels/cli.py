"""The command line: `python -m dkm_kernels` (or `dkm-kernels`).

    demo (default)   train a small CNN on scikit-learn's digits, then compress it at several
                     palette configurations with DKM (fine-tuning with DKM in the loop) and with
                     post-training k-means (same palettes, no training); print accuracy and size;
                     with coremltools installed, also write the DKM model of one configuration
                     as a Core ML model (palettized ML program) and print its size
    info PATH        summarise a file written by save_compressed / export_compressed
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch
from torch import nn

DEFAULT_CONFIGS = "1/1,2/1,3/1,4/4,4/8"
# The DKM configuration written as a Core ML model (the first of --configs when absent).
DEFAULT_COREML_CONFIG = "2/1"
# --quick: enough epochs to run every step once, and the extreme palettes of the default set.
QUICK_EPOCHS, QUICK_DKM_EPOCHS, QUICK_CONFIGS = 2, 1, "1/1,4/8"
# scikit-learn's digits are 8x8 images of intensities 0..16.
DIGITS_MAX_INTENSITY = 16.0
# The share of the digits held out for testing (450 of 1797 images).
TEST_FRACTION = 0.25
# The exit status of a command that failed (a file that is not a readable export).
EXIT_FAILURE = 1


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digit images: 40k weights in three convolutions and two linears."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_digits_split(seed: int):
    """scikit-learn's bundled digits (no download): 75% train, 25% test, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    images = images / DIGITS_MAX_INTENSITY
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=TEST_FRACTION, random_state=seed,
        stratify=digits.target)
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def train(model: nn.Module, data, epochs: int, lr: float, seed: int, batch_size: int = 32,
          on_epoch=None) -> None:
    images, labels = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            criterion(model(images[batch]), labels[batch]).backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    images, labels = data
    model.eval()
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def _parse_configs(text: str) -> list[tuple[int, int]]:
    from .compress import parse_config

    configs = []
    for item in filter(None, (piece.strip() for piece in text.split(","))):
        parsed = parse_config(item)
        configs.append((parsed["bits"], parsed.get("dim", 1)))
    if not configs:
        raise SystemExit("--configs needs at least one bits/dim entry, such as 1/1")
    return configs


def run_demo(args) -> list[dict]:
    try:
        import sklearn  # noqa: F401  (the data set)
        from tqdm import tqdm
    except ImportError as error:
        raise SystemExit(f"the demo needs scikit-learn and tqdm ({error}): "
                         f"pip install scikit-learn tqdm") from error

    from .compress import compress_model
    from .export import export_bytes

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    train_data, test_data = load_digits_split(args.seed)
    configs = _parse_configs(args.configs)
    deployed = _parse_configs(args.coreml_config)[0]
    deployed = deployed if deployed in configs else configs[0]
    deployment = None
    total_epochs = args.epochs + len(configs) * args.dkm_epochs
    progress = tqdm(total=total_epochs, desc="training", unit="epoch", file=sys.stderr,
                    disable=args.no_progress)

    float_model = DigitsCNN()
    progress.set_description("float baseline")
    train(float_model, train_data, args.epochs, args.lr, args.seed, args.batch_size,
          on_epoch=lambda: progress.update())
    float_state = {k: v.clone() for k, v in float_model.state_dict().items()}
    float_bytes = sum(v.numel() * v.element_size() for v in float_state.values())
    rows = [{"method": "float32", "config": "-",
             "bits_per_weight": float(torch.finfo(torch.float32).bits),
             "accuracy": accuracy(float_model, test_data), "bytes": float_bytes, "ratio": 1.0}]

    def compressed_copy(bits: int, dim: int):
        model = DigitsCNN()
        model.load_state_dict(float_state)
        # Every layer at the configuration: the demo compares palettes, so no layer is kept
        # at float or 8 bits (no first/last skipping, no small-layer rule).
        return compress_model(model, bits=bits, dim=dim, tau=args.tau, skip_first_last=False,
                              small_layer_threshold=0, seed=args.seed)

    for bits, dim in configs:
        notation = f"{bits}/{dim}"
        for method in ("k-means", "DKM"):
            compressor = compressed_copy(bits, dim)
            if method == "k-means":
                compressor.fit_kmeans()
            else:
                progress.set_description(f"DKM {notation}")
                train(compressor, train_data, args.dkm_epochs, args.dkm_lr, args.seed,
                      args.dkm_batch_size, on_epoch=lambda: progress.update())
            compressor.snap_weights()
            info = compressor.get_compression_info()
            export = compressor.export_compressed()
            if export_bytes(export) != info["compressed_bytes"]:  # the size must be the stored size
                raise RuntimeError(f"{method} {notation}: export holds {export_bytes(export)} "
                                   f"bytes, info counts {info['compressed_bytes']}")
            rows.append({"method": method, "config": notation, "bits_per_weight": bits / dim,
                         "accuracy": accuracy(compressor, test_data),
                         "bytes": info["compressed_bytes"], "ratio": info["compression_ratio"]})
            if method == "DKM" and (bits, dim) == deployed:
                deployment = (notation, compressor, info["compressed_bytes"])
    progress.close()
    elapsed = time.perf_counter() - started
    print_table(rows, train_data, test_data, args, elapsed)
    if not args.no_coreml:
        write_coreml(*deployment, args)
    return rows


def weight_file_bytes(mlpackage: str) -> int:
    """Bytes of the weight file of a saved ML program (the palettes, indices and dense tensors)."""
    return os.path.getsize(os.path.join(mlpackage, "Data", "com.apple.CoreML", "weights",
                                        "weight.bin"))


def write_coreml(notation: str, compressor, export_bytes: int, args) -> str | None:
    """Convert the DKM model of `notation` to Core ML, save it and print its size; returns the
    path (None when coremltools is missing or the palettes cannot be laid out in Core ML)."""
    try:
        import coremltools  # noqa: F401
    except ImportError:
        print("Core ML: pip install coremltools to also write the DKM model as a Core ML model")
        return None
    path = args.coreml or os.path.join(tempfile.gettempdir(),
                                       f"dkm_digits_{notation.replace('/', '_')}.mlpackage")
    example = torch.zeros(1, 1, 8, 8)
    try:
        compressor.to_coreml(example, path)
    except ValueError as error:
        print(f"Core ML: DKM {notation} not written: {' '.join(str(error).split())}")
        return None
    print(f"Core ML: DKM {notation} written to {path}, weight file {weight_file_bytes(path)} B "
          f"(palettized, float16 biases; the export above: {export_bytes} B)")
    return path


def print_table(rows, train_data, test_data, args, elapsed: float) -> None:
    from . import backends

    backend = backends.choose(torch.device("cpu"), torch.float32)
    print(f"digits (scikit-learn): {len(train_data[1])} train / {len(test_data[1])} test images; "
          f"DigitsCNN, {args.epochs} float epochs, {args.dkm_epochs} DKM epochs per config, "
          f"tau={args.tau}, seed {args.seed}, backend {backend!r}, "
          f"{torch.get_num_threads()} threads")
    print("every Conv2d and Linear weight clustered at the config (b bits per d weights); "
          "palettes in float16; biases float32; size counts every stored byte")
    header = (f"| {'method':<8} | {'b/d':<4} | {'bits/weight':>11} | {'test acc':>8} "
              f"| {'size':>9} | {'ratio':>6} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(f"| {row['method']:<8} | {row['config']:<4} | {row['bits_per_weight']:>11.3g} | "
              f"{100 * row['accuracy']:>7.1f}% | {row['bytes']:>7} B | {row['ratio']:>5.1f}x |")
    print(f"total time {elapsed:.1f} s")


def run_info(args) -> int:
    """Describe a saved export; a file that cannot be read as one is a one-line error."""
    from .export import export_bytes, read_export
    from .utils import NAME_WIDTH, format_bytes

    try:
        export = read_export(args.path)
    except (OSError, ValueError) as error:
        print(f"dkm-kernels info: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{args.path}: palettes in {export['lut_dtype']}")
    for name, meta in export["layer_configs"].items():
        numel = math.prod(meta["shape"])
        tied = f" tied to {', '.join(meta['tied'])}" if meta.get("tied") else ""
        print(f"  {name:<{NAME_WIDTH}} {str(tuple(meta['shape'])):<18} "
              f"{meta['bits']}/{meta['dim']} "
              f"k={meta['n_clusters']} groups={meta['groups']}"
              f"{' scaled' if meta['per_channel_scale'] else ''}"
              f"{' ' + meta['lut_quantization'] if meta.get('lut_quantization') else ''}"
              f" ({numel} weights){tied}")
    print(f"  uncompressed tensors: {len(export['uncompressed'])}")
    print(f"  stored tensor bytes: {format_bytes(export_bytes(export))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dkm-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="DKM vs post-training k-means on digits (default)")
    add_demo_arguments(demo)
    info = commands.add_parser("info", help="summarise a saved compressed model")
    info.add_argument("path")
    return parser


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help=f"bits/dim palettes to compare (default {DEFAULT_CONFIGS})")
    parser.add_argument("--epochs", type=int, default=20, help="float training epochs")
    parser.add_argument("--dkm-epochs", type=int, default=8,
                        help="DKM fine-tuning epochs per config")
    parser.add_argument("--batch-size", type=int, default=32, help="float training batch size")
    parser.add_argument("--dkm-batch-size", type=int, default=64, help="DKM fine-tuning batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, float training")
    parser.add_argument("--dkm-lr", type=float, default=2e-3, help="Adam learning rate, DKM")
    parser.add_argument("--tau", default="auto", type=lambda v: v if v == "auto" else float(v),
                        help="DKM temperature, a number or 'auto' (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 float epochs, 1 DKM epoch, configs 1/1 and 4/8")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--coreml", default=None, metavar="PATH",
                        help="where to write the Core ML model (.mlpackage; default: in the "
                             "temporary directory); needs coremltools")
    parser.add_argument("--coreml-config", default=DEFAULT_COREML_CONFIG,
                        help=f"the DKM configuration written as a Core ML model (default "
                             f"{DEFAULT_COREML_CONFIG}, else the first of --configs)")
    parser.add_argument("--no-coreml", action="store_true", help="do not write a Core ML model")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("demo", "info", "-h", "--help"):
        argv.insert(0, "demo")
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return run_info(args)
    if args.quick:
        args.epochs, args.dkm_epochs = QUICK_EPOCHS, QUICK_DKM_EPOCHS
        if args.configs == DEFAULT_CONFIGS:
            args.configs = QUICK_CONFIGS
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
