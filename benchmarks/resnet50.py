"""ResNet-50 compressed at cv:8/8 fc:8/8 and trained: peak memory and step time.

    python benchmarks/resnet50.py                    # CPU, batch 8, 3 steps
    python benchmarks/resnet50.py --device cuda --batch 64

Every convolution and the classifier are clustered (k = 256 centroids of dimension 8; layers of
fewer than 10,000 weights with 256 scalar centroids, the paper's rule), then a few SGD steps run on
synthetic 224x224 batches. The naive DKM's memory for the same model is given as a lower bound,
the attention matrices it keeps for backward: sum over layers of L * M * k * 4 bytes (L = 5
iterations; the reference keeps more than that in practice, see tests/test_memory.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402
from resnet50_model import resnet50  # noqa: E402

import dkm_kernels  # noqa: E402
from dkm_kernels import compress_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def naive_attention_bytes(compressor, max_iter: int) -> int:
    """Bytes of the M x k attention matrices the naive DKM keeps for backward, all layers."""
    total = 0
    for layer in compressor.get_compression_info()["layers"]:
        rows = layer["params"] // layer["dim"]
        total += max_iter * rows * layer["n_clusters"] * 4
    return total


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tau", type=float, default=8e-5)
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/resnet50_<device>.json)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = resnet50().to(device)
    compressor = compress_model(
        model, bits=8, dim=8, tau=args.tau, skip_first_last=False, backend=args.backend,
        conv_config={"bits": 8, "dim": 8}, fc_config={"bits": 8, "dim": 8},
    )
    optimizer = torch.optim.SGD(compressor.parameters(), lr=0.008, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    compressor.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    step_times = []
    for _ in tqdm(range(args.steps), desc=f"ResNet-50 8/8 steps (batch {args.batch})"):
        images = torch.randn(args.batch, 3, 224, 224, device=device)
        labels = torch.randint(0, 1000, (args.batch,), device=device)
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

    info = compressor.get_compression_info()
    result = {
        "what": "ResNet-50 cv:8/8 fc:8/8, full training step (forward, backward, SGD) on synthetic 224x224",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"],
        "machine": machine(),
        "batch": args.batch,
        "backend": (args.backend if args.backend != "auto"
                    else dkm_kernels.backends.choose(device, torch.float32)),
        "clustered_layers": len(info["layers"]),
        "step_seconds": step_times,
        "step_seconds_after_first": min(step_times[1:]) if len(step_times) > 1 else step_times[0],
        "peak_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()),
        "peak_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (ru_maxrss)",
        "naive_dkm_attention_bytes_lower_bound": naive_attention_bytes(compressor, 5),
        "dkm_kernels": dkm_kernels.__version__,
    }
    gib = 2**30
    print(f"\nResNet-50 8/8, batch {args.batch} on {result['device']} ({result['backend']} backend)")
    print(f"  step time (best after the first): {result['step_seconds_after_first']:.2f} s")
    print(f"  peak memory ({result['peak_kind']}): {result['peak_bytes'] / gib:.2f} GiB")
    print(f"  naive DKM, attention kept for backward alone: >= "
          f"{result['naive_dkm_attention_bytes_lower_bound'] / gib:.1f} GiB")
    out = args.out or os.path.join(RESULTS, f"resnet50_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"  written to {out}")
    return result


if __name__ == "__main__":
    main()
