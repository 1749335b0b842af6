"""ResNet-50 compressed at cv:8/8 fc:8/8 and trained: peak memory and step time.

    python benchmarks/resnet50.py                    # CPU, batch 8, 3 steps
    python benchmarks/resnet50.py --device cuda --batch 64
    python benchmarks/resnet50.py --device cuda --batch 64 --uncompressed   # the same step, no DKM

Every convolution and the classifier are clustered (k = 256 centroids of dimension 8; layers of
fewer than 10,000 weights with 256 scalar centroids, the paper's rule), then a few SGD steps run on
synthetic 224x224 batches. The naive DKM's memory for the same model is given as a lower bound,
the attention matrices it keeps for backward: sum over layers of L * M * k * 4 bytes (L = 5
iterations; the reference keeps more than that in practice, see tests/test_memory.py).
Peak memory: on a GPU torch.cuda.max_memory_allocated over the steps, on the CPU the process's
resident high-water mark (ru_maxrss), model and data included.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    ITERATIONS,
    CudaPeak,
    machine,
    naive_attention_bytes,
    resident_high_water_bytes,
    results_path,
    script_parser,
    write_json,
)
from resnet50_model import resnet50  # noqa: E402

import dkm_kernels  # noqa: E402
from dkm_kernels import compress_model  # noqa: E402

# ImageNet's input: 224 x 224 RGB crops, 1000 classes (synthetic here: time and memory only).
IMAGE_SIZE = 224
CLASSES = 1000
# The recorded run's temperature and SGD settings; they change the arithmetic's values, not its
# amount, so neither the step time nor the memory depends on them.
TAU = 8e-5
LEARNING_RATE = 0.008
MOMENTUM = 0.9


def naive_model_attention_bytes(compressor) -> int:
    """naive_attention_bytes summed over every clustered layer of the model."""
    return sum(naive_attention_bytes(layer["params"] // layer["dim"], layer["n_clusters"], ITERATIONS)
               for layer in compressor.get_compression_info()["layers"])


def main(argv=None) -> dict:
    parser = script_parser(__doc__, device=True, backend="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tau", type=float, default=TAU)
    parser.add_argument("--uncompressed", action="store_true",
                        help="train the plain model: the step DKM's cost is measured against")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/resnet50_<device>.json)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = resnet50().to(device)
    if args.uncompressed:
        compressor, what = model, "ResNet-50 uncompressed"
    else:
        compressor, what = compress_model(
            model, bits=8, dim=8, tau=args.tau, skip_first_last=False, backend=args.backend,
            conv_config={"bits": 8, "dim": 8}, fc_config={"bits": 8, "dim": 8},
        ), "ResNet-50 cv:8/8 fc:8/8"
    optimizer = torch.optim.SGD(compressor.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    criterion = nn.CrossEntropyLoss()
    compressor.train()

    step_times = []
    # On a GPU the peak of every step, the model included; on the CPU the whole process's.
    peak = CudaPeak(device) if device.type == "cuda" else contextlib.nullcontext()
    with peak:
        for _ in tqdm(range(args.steps), desc=f"{what} steps (batch {args.batch})"):
            images = torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
            labels = torch.randint(0, CLASSES, (args.batch,), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(compressor(images), labels)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - start)

    result = {
        "what": f"{what}, full training step (forward, backward, SGD) on synthetic 224x224",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"],
        "machine": machine(),
        "batch": args.batch,
        "backend": (None if args.uncompressed else args.backend if args.backend != "auto"
                    else dkm_kernels.backends.choose(device, torch.float32)),
        "clustered_layers": 0 if args.uncompressed else len(compressor.get_compression_info()["layers"]),
        "step_seconds": step_times,
        "step_seconds_after_first": min(step_times[1:]) if len(step_times) > 1 else step_times[0],
        "peak_bytes": peak.total if device.type == "cuda" else resident_high_water_bytes(),
        "peak_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (ru_maxrss)",
        "naive_dkm_attention_bytes_lower_bound": (None if args.uncompressed
                                                  else naive_model_attention_bytes(compressor)),
        "dkm_kernels": dkm_kernels.__version__,
    }
    gib = 2**30
    print(f"\n{what}, batch {args.batch} on {result['device']} ({result['backend'] or 'no DKM'})")
    print(f"  step time (best after the first): {result['step_seconds_after_first']:.3f} s")
    print(f"  peak memory ({result['peak_kind']}): {result['peak_bytes'] / gib:.2f} GiB")
    if not args.uncompressed:
        print(f"  naive DKM, attention kept for backward alone: >= "
              f"{result['naive_dkm_attention_bytes_lower_bound'] / gib:.1f} GiB")
    suffix = "_uncompressed" if args.uncompressed else ""
    write_json(args.out or results_path(f"resnet50_{device.type}{suffix}.json"), result)
    return result


if __name__ == "__main__":
    main()
