"""`DKMLayer`: differentiable k-means of one weight tensor, with a warm start across steps.

A drop-in for the public implementation's `DKMLayer(weight_tensor, n_clusters, tau, dim, max_iter,
epsilon, init_method)`, running the memory-efficient op `dkm_kernels.dkm` instead of materialising
the attention matrix. It is also the parametrization `compress_model` registers on every clustered
layer (`torch.nn.utils.parametrize`): called with a weight it returns the clustered weight.

Layout of the clustering problems. The weight's first axis holds the output channels (rows of a
Linear or Embedding, filters of a Conv). With `group_size=None` the whole tensor is one problem:
`weight.reshape(-1, dim)`, exactly as the public implementation reshapes it. With `group_size=g`,
the output channels are split into `out_channels / g` consecutive groups, each with its own palette
(Core ML's per-grouped-channel granularity), and all groups run in one call of the op.

Per-channel scale (`enable_per_channel_scale=True`): every output channel is divided by its scale
`s_o = max |W[o, ...]|` (at least the smallest normal number of `lut_dtype`, then rounded to
`lut_dtype`) before clustering, and the clustered values are multiplied back by it. The scale is a
function of the current weights, recomputed on every call, and is not differentiated (it is a
constant of each step); the export stores it next to the palette.

Modes. Training: soft DKM (gradients reach the weight through every iteration), and the final
centroids become the next call's warm start. Evaluation: every weight vector takes its nearest
stored centroid (a hard assignment) and the centroids do not move.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import check_count, dkm
from .init import INIT_METHODS, init_centroids
from .kmeans import lloyd_kmeans, nearest_centroids

# tau="auto": tau = AUTO_TAU_FRACTION * (mean squared distance of the weight vectors to their
# nearest k-means++ centroid). At that temperature a vector midway between two centroids splits its
# attention, while a vector on a centroid is essentially assigned: soft, but far from uniform.
AUTO_TAU_FRACTION = 0.25

def check_layer_options(shape: tuple, n_clusters, tau, dim, max_iter, epsilon, init_method,
                        group_size) -> int:
    """Validate the clustering options of a weight of `shape`; returns the number of palettes.

    Raises a ValueError naming the option (compress_model adds the layer's name).
    """
    check_count("n_clusters", n_clusters)
    check_count("dim", dim)
    check_count("max_iter", max_iter)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    if init_method not in INIT_METHODS:
        raise ValueError(f"init_method must be one of {INIT_METHODS}, got {init_method!r}")
    if tau != "auto" and (isinstance(tau, bool) or not isinstance(tau, (int, float))
                          or not math.isfinite(tau) or tau <= 0):
        raise ValueError(f"tau must be a number > 0 or 'auto', got {tau!r}")
    numel = math.prod(shape)
    if len(shape) < 1 or numel == 0:
        raise ValueError("weight_tensor must have at least one element")
    out_channels = shape[0]
    if group_size is not None:
        check_count("group_size", group_size, allowed=" or None")
        if out_channels % group_size:
            raise ValueError(
                f"group_size={group_size} does not divide the {out_channels} output channels")
    groups = 1 if group_size is None else out_channels // group_size
    per_group = numel // groups
    if per_group % dim:
        where = "the weight's" if groups == 1 else f"each group's (group_size={group_size})"
        raise ValueError(f"dim={dim} does not divide {where} {per_group} elements "
                         f"(weight shape {tuple(shape)})")
    return groups


class DKMLayer(nn.Module):
    """Differentiable k-means clustering of one weight tensor.

    Args:
        weight_tensor: the weight to cluster (its values seed the centroids; its shape is fixed).
        n_clusters: k, the palette size (2**bits).
        tau: softmax temperature > 0, or "auto" (AUTO_TAU_FRACTION times the mean squared distance
            of the weight vectors to their nearest k-means++ centroid, fixed at initialisation).
        dim: d, the length of the weight vectors that share a palette entry.
        max_iter, epsilon: the DKM iterations per call stop after max_iter, or after the first
            iteration in which no centroid moves more than epsilon.
        init_method: "kmeans++" or "random".
        backend: the op's backend ("auto" picks the fastest available).
        group_size: output channels per palette (None: one palette for the whole tensor).
        enable_per_channel_scale: cluster weight / scale per output channel (see the module doc).
        lut_dtype: the dtype palettes and scales are exported in; snapping rounds to it.
        generator / seed: the source of the initialisation's random numbers (seed builds a
            generator on the weight's device).
        keep_weight: hold `weight_tensor` as `self.weight`, so that `layer()` clusters it (the
            public implementation's behaviour); `compress_model` passes False, since
            parametrize owns the weight there.
        lazy_init: leave the centroids unset until the first clustered call (they are then
            computed from the weight of that moment).
    """

    def __init__(self, weight_tensor: Tensor, n_clusters: int = 16, tau: float | str = 2e-5,
                 dim: int = 1, max_iter: int = 5, epsilon: float = 1e-4,
                 init_method: str = "kmeans++", backend: str = "auto",
                 group_size: int | None = None, enable_per_channel_scale: bool = False,
                 lut_dtype: torch.dtype = torch.float16,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 keep_weight: bool = True, lazy_init: bool = False):
        super().__init__()
        groups = check_layer_options(tuple(weight_tensor.shape), n_clusters, tau, dim, max_iter,
                                     epsilon, init_method, group_size)
        if lut_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"lut_dtype must be float16, bfloat16 or float32, got {lut_dtype}")

        self.n_clusters = n_clusters
        self.dim = dim
        self.max_iter = max_iter
        self.epsilon = float(epsilon)
        self.init_method = init_method
        self.backend = backend
        self.group_size = group_size
        self.groups = groups
        self.enable_per_channel_scale = bool(enable_per_channel_scale)
        self.lut_dtype = lut_dtype
        self.original_shape = tuple(weight_tensor.shape)
        self.n_vectors = weight_tensor.numel() // dim
        self.auto_tau = tau == "auto"
        # Compress_model switches this off before its milestone step: the weight passes unchanged.
        self.active = True
        if generator is None and seed is not None:
            generator = torch.Generator(device=weight_tensor.device).manual_seed(seed)
        self.generator = generator
        if keep_weight:
            self.weight = weight_tensor

        shape = (n_clusters, dim) if groups == 1 else (groups, n_clusters, dim)
        self.register_buffer("centroids", torch.zeros(shape, dtype=torch.float32,
                                                      device=weight_tensor.device))
        # A fixed tau stays an exact Python float; an auto tau is a buffer, saved with the
        # checkpoint (float32: buffers must move to any device, MPS included).
        self._fixed_tau = None if self.auto_tau else float(tau)
        self.register_buffer("tau_value", torch.tensor(float("nan") if self.auto_tau else tau,
                                                       dtype=torch.float32))
        self.register_buffer("initialized", torch.tensor(False))
        if not lazy_init:
            self.initialize(weight_tensor)

    # -- layout -----------------------------------------------------------------------------------

    @property
    def tau(self) -> float:
        return float(self.tau_value) if self._fixed_tau is None else self._fixed_tau

    @property
    def bits(self) -> int:
        """Bits of one palette index."""
        return max(1, math.ceil(math.log2(self.n_clusters)))

    def channel_scale(self, weight: Tensor) -> Tensor:
        """Per-output-channel scale, shaped to broadcast against the weight (fp32, no gradient)."""
        with torch.no_grad():
            flat = weight.detach().reshape(weight.shape[0], -1).float()
            tiny = torch.finfo(self.lut_dtype).tiny
            scale = flat.abs().amax(dim=1).clamp_min(tiny).to(self.lut_dtype).float()
        return scale.reshape((-1,) + (1,) * (weight.dim() - 1))

    def normalized(self, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weight as clustered (divided by its channel scales when enabled), and the scale."""
        if not self.enable_per_channel_scale:
            return weight, None
        scale = self.channel_scale(weight)
        return weight / scale.to(weight.dtype), scale

    def rows(self, weight: Tensor) -> Tensor:
        """(G, M, d): the clustering problems of a weight (already normalised)."""
        return weight.reshape(self.groups, -1, self.dim)

    def _grouped_centroids(self) -> Tensor:
        return self.centroids if self.groups > 1 else self.centroids.unsqueeze(0)

    # -- state ------------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, weight: Tensor | None = None) -> None:
        """Seed the centroids (and tau, when "auto") from `weight` (default: self.weight)."""
        weight = self._weight_or(weight).detach()
        rows = self.rows(self.normalized(weight)[0]).float()
        generator = self.generator
        if generator is not None and generator.device.type != rows.device.type:
            # The model moved since the generator was made: continue its stream on the new device.
            seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
            generator = self.generator = torch.Generator(device=rows.device).manual_seed(seed)
        centroids = init_centroids(rows, self.n_clusters, self.init_method, generator)
        if self.auto_tau:
            nearest = nearest_centroids(rows, centroids)
            chosen = torch.gather(centroids, 1, nearest.unsqueeze(-1).expand(-1, -1, self.dim))
            mean_sq = (rows - chosen).square().sum(-1).mean().item()
            # All vectors on a centroid: any tau gives one-hot attention; avoid tau == 0.
            self.tau_value.fill_(max(AUTO_TAU_FRACTION * mean_sq, 1e-12))
        self.centroids.copy_(centroids.reshape(self.centroids.shape))
        self.initialized.fill_(True)

    def _weight_or(self, weight: Tensor | None) -> Tensor:
        if weight is not None:
            return weight
        if "weight" not in self.__dict__ and "weight" not in self._parameters:
            raise ValueError("this DKMLayer holds no weight (keep_weight=False): pass one")
        return self.weight

    # -- clustering -------------------------------------------------------------------------------

    def forward(self, weight: Tensor | None = None,
                weight_override: Tensor | None = None) -> Tensor:
        """The clustered weight: soft DKM in training, nearest stored centroid in evaluation.

        `weight_override` is the public implementation's name for the same argument.
        """
        weight = self._weight_or(weight if weight is not None else weight_override)
        if not self.active:
            return weight
        if tuple(weight.shape) != self.original_shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, this layer clusters "
                             f"{self.original_shape}")
        if not bool(self.initialized):
            self.initialize(weight)
        if not self.training:
            return self.hard_weight(weight)
        normalized, scale = self.normalized(weight)
        centroids = self._grouped_centroids()
        if normalized.dtype == torch.float64:
            centroids = centroids.double()
        result = dkm(self.rows(normalized), centroids, self.tau, self.max_iter, self.epsilon,
                     backend=self.backend)
        with torch.no_grad():  # the warm start of the next call
            self.centroids.copy_(result.centroids.reshape(self.centroids.shape))
        clustered = result.weights.reshape(weight.shape)
        return clustered if scale is None else clustered * scale.to(clustered.dtype)

    @torch.no_grad()
    def get_assignments(self, weight: Tensor | None = None) -> Tensor:
        """Index of the nearest stored centroid of every weight vector: (M,) or (G, M) int64."""
        weight = self._weight_or(weight)
        indices = nearest_centroids(self.rows(self.normalized(weight)[0]),
                                    self._grouped_centroids())
        return indices[0] if self.groups == 1 else indices

    def get_codebook(self) -> Tensor:
        """The centroids, (k, d) or (G, k, d), fp32 (a copy)."""
        return self.centroids.clone()

    @torch.no_grad()
    def hard_weight(self, weight: Tensor | None = None) -> Tensor:
        """Every weight vector replaced by its nearest stored centroid (and rescaled)."""
        weight = self._weight_or(weight)
        normalized, scale = self.normalized(weight)
        centroids = self._grouped_centroids()
        indices = nearest_centroids(self.rows(normalized), centroids)
        values = torch.gather(centroids, 1, indices.unsqueeze(-1).expand(-1, -1, self.dim))
        values = values.reshape(weight.shape)
        if scale is not None:
            values = values * scale
        return values.to(weight.dtype)

    @torch.no_grad()
    def fit_kmeans(self, weight: Tensor | None = None, iterations: int = 50) -> None:
        """Post-training palettization: hard k-means (Lloyd) from the stored centroids."""
        weight = self._weight_or(weight)
        if not bool(self.initialized):
            self.initialize(weight)
        rows = self.rows(self.normalized(weight)[0])
        fitted = lloyd_kmeans(rows, self._grouped_centroids(), iterations)
        self.centroids.copy_(fitted.reshape(self.centroids.shape))

    def extra_repr(self) -> str:
        tau = "auto (unset)" if math.isnan(self.tau) else f"{self.tau:.3g}"
        text = (f"n_clusters={self.n_clusters}, tau={tau}, dim={self.dim}, "
                f"max_iter={self.max_iter}, eps={self.epsilon}, bits={self.bits}, "
                f"bits_per_weight={self.bits / self.dim:.3g}, "
                f"weight_shape={list(self.original_shape)}")
        if self.groups > 1:
            text += f", group_size={self.group_size}, groups={self.groups}"
        if self.enable_per_channel_scale:
            text += ", per_channel_scale=True"
        return text
