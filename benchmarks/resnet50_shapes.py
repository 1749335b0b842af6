"""ResNet-50's weight shapes (torchvision's layout, no torchvision needed), and how each is
clustered at cv:8/8 fc:8/8.

    from resnet50_shapes import RESNET50_WEIGHTS, clustering_plan

Only the convolution and classifier weights are clustered (biases and batch-norm parameters stay
in float, as in the paper). The rules, the paper's:
- a weight with fewer than 10,000 elements gets an 8-bit scalar palette: k = 256 centroids of
  dimension d = 1 (here: conv1, 64x3x7x7 = 9,408, and layer1.0.conv1, 64x64x1x1 = 4,096);
- every other weight gets k = 256 centroids of dimension d = 8, the weight viewed as
  (numel / 8, 8) rows; if 8 did not divide numel it would fall back to d = 1 (no ResNet-50 weight
  needs that: every channel count is a multiple of 64).
"""
from __future__ import annotations

SMALL_LAYER = 10_000


def _bottleneck_stage(name: str, blocks: int, in_channels: int, width: int) -> list[tuple[str, tuple]]:
    out_channels = width * 4
    shapes = []
    for b in range(blocks):
        block_in = in_channels if b == 0 else out_channels
        prefix = f"{name}.{b}"
        shapes += [
            (f"{prefix}.conv1.weight", (width, block_in, 1, 1)),
            (f"{prefix}.conv2.weight", (width, width, 3, 3)),
            (f"{prefix}.conv3.weight", (out_channels, width, 1, 1)),
        ]
        if b == 0:
            shapes.append((f"{prefix}.downsample.0.weight", (out_channels, block_in, 1, 1)))
    return shapes


RESNET50_WEIGHTS: list[tuple[str, tuple]] = (
    [("conv1.weight", (64, 3, 7, 7))]
    + _bottleneck_stage("layer1", 3, 64, 64)
    + _bottleneck_stage("layer2", 4, 256, 128)
    + _bottleneck_stage("layer3", 6, 512, 256)
    + _bottleneck_stage("layer4", 3, 1024, 512)
    + [("fc.weight", (1000, 2048))]
)


def numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def clustering_plan(bits: int = 8, dim: int = 8) -> list[dict]:
    """One entry per clustered weight: name, shape, numel, d, k and M = numel / d."""
    k = 2**bits
    plan = []
    for name, shape in RESNET50_WEIGHTS:
        n = numel(shape)
        d = 1 if n < SMALL_LAYER or n % dim else dim
        plan.append(dict(name=name, shape=shape, numel=n, d=d, k=k, m=n // d))
    return plan


if __name__ == "__main__":
    plan = clustering_plan()
    for layer in plan:
        print(f"{layer['name']:<28} {str(layer['shape']):<22} M={layer['m']:>9,} d={layer['d']} k={layer['k']}")
    print(f"{len(plan)} weights, {sum(p['numel'] for p in plan):,} elements")
