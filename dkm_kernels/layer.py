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
A vector of d weights is, by default (`vector_axis="flat"`), d consecutive elements of the
flattened weight; `vector_axis="output"` takes d consecutive output channels at the same position
instead (coremltools' layout, which Core ML can deploy for any convolution). Only how the weight
becomes rows differs (`weight_rows` / `rows_to_weight`); the op is the same.

Per-channel scale (`enable_per_channel_scale=True`): every output channel is divided by its scale
`s_o = max |W[o, ...]|` (at least the smallest normal number of `lut_dtype`, then rounded to
`lut_dtype`) before clustering, and the clustered values are multiplied back by it. The scale is a
function of the current weights, recomputed on every call, and is not differentiated (it is a
constant of each step); the export stores it next to the palette.

Modes. Training: soft DKM (gradients reach the weight through every iteration) from the committed
centroids; the final centroids are recorded as pending and become the warm start when `advance()`
commits them (a standalone layer commits at its next call; compress_model once per model forward,
so that a forward recomputed by gradient checkpointing clusters from the same start). Evaluation:
every weight vector takes its nearest stored centroid (a hard assignment) and the centroids do not
move; a NaN or Inf weight raises a ValueError (on the CPU) or comes out NaN (on other devices,
where checking would wait for the device).
"""
from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from . import backends, distributed, unique
from ._ops import MAX_ITER_LIMIT, ErrorPrefix
from .functional import DKMProblem, check_count, dkm, uniquified
from .init import INIT_METHODS, SEED_BOUND, init_centroids, kmeans_plus_plus
from .kmeans import nearest_centroids, nearest_centroids_checked, lloyd_kmeans

# tau="auto": tau = AUTO_TAU_FRACTION * (mean squared distance of the weight vectors to their
# nearest k-means++ centroid). At that temperature a vector midway between two centroids splits its
# attention, while a vector on a centroid is essentially assigned: soft, but far from uniform.
AUTO_TAU_FRACTION = 0.25
# tau="auto" when every vector already sits on a centroid (mean distance 0): any tau gives one-hot
# attention, and the op needs tau > 0.
MIN_AUTO_TAU = 1e-12
# The op keeps max_iter + 1 centroid sets of G x k x d float32 for backward; a max_iter that would
# make that history larger than this is a mistake, not a setting (the paper runs 5 iterations).
MAX_CENTROID_HISTORY_BYTES = 2**30
LUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 8-bit integer palettes: each palette stored as int8 or uint8 entries times a per-palette scale
# (dkm_kernels.snapping.quantize_palette), the scale in lut_dtype.
LUT_QUANTIZATIONS = ("int8", "uint8")
# How d weights form a vector: d consecutive elements of weight.reshape(-1), or d consecutive
# output channels (axis 0) at the same position of the other axes.
VECTOR_AXES = ("flat", "output")
# Defaults of the public implementation and the paper: tau for 2-bit ResNet-18 on ImageNet, five
# DKM iterations per step, stopping early once no centroid moves more than epsilon.
DEFAULT_TAU = 2e-5
DEFAULT_MAX_ITER = 5
DEFAULT_EPSILON = 1e-4


def check_bool(name: str, value) -> bool:
    """True or False only: a number where a flag is expected is a mistake (1 is not a flag)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_uniquify(value):
    """True, False, or "bfloat16" (float32 weights clustered through their bfloat16 rounding)."""
    if not (isinstance(value, bool) or value == "bfloat16"):
        raise ValueError(f"uniquify must be True, False or 'bfloat16', got {value!r}")
    return value


def check_lut_dtype(lut_dtype) -> torch.dtype:
    if lut_dtype not in LUT_DTYPES:
        hint = ""
        if lut_dtype in (torch.int8, torch.uint8, *LUT_QUANTIZATIONS):
            name = str(lut_dtype).removeprefix("torch.")
            hint = (f" (lut_dtype is the float dtype of palettes and scales; for 8-bit integer "
                    f"palettes pass lut_quantization={name!r})")
        raise ValueError(f"lut_dtype must be torch.float16, torch.bfloat16 or torch.float32, "
                         f"got {lut_dtype!r}{hint}")
    return lut_dtype


def check_lut_quantization(value) -> str | None:
    """None (float palettes), "int8" or "uint8" (torch.int8 / torch.uint8 accepted); returns the
    name."""
    if value in (torch.int8, torch.uint8):
        value = str(value).removeprefix("torch.")
    if value is not None and value not in LUT_QUANTIZATIONS:
        raise ValueError(f"lut_quantization must be None, 'int8' or 'uint8', got {value!r}")
    return value


def check_seed(seed) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    return seed


def weight_rows(weight: Tensor, groups: int, dim: int, vector_axis: str = "flat") -> Tensor:
    """(G, M, d): the clustering problems of a weight, G consecutive blocks of output channels."""
    if vector_axis == "flat":
        return weight.reshape(groups, -1, dim)
    # (G, O/(G d), d, rest) -> vectors ordered by (channel block, position): Core ML's order.
    blocks = weight.reshape(groups, weight.shape[0] // (groups * dim), dim, -1)
    return blocks.transpose(2, 3).reshape(groups, -1, dim)


def rows_to_weight(rows: Tensor, shape, vector_axis: str = "flat") -> Tensor:
    """The inverse of weight_rows: (G, M, d) back to a weight of `shape`."""
    if vector_axis == "flat":
        return rows.reshape(shape)
    groups, _, dim = rows.shape
    blocks = rows.reshape(groups, shape[0] // (groups * dim), -1, dim)
    return blocks.transpose(2, 3).reshape(shape)


def row_elements(shape, groups: int, dim: int, vector_axis: str, rows: Tensor) -> Tensor:
    """(G, S, d): the flat indices into a weight of `shape` of the elements of rows `rows` (G, S)
    of each palette: weight.reshape(-1)[row_elements(...)] == weight_rows(weight, ...)[g, rows]."""
    numel = math.prod(shape)
    palette = torch.arange(groups, device=rows.device).view(-1, 1, 1)
    element = torch.arange(dim, device=rows.device)
    rows = rows.unsqueeze(-1)
    if vector_axis == "flat":
        return palette * (numel // groups) + rows * dim + element
    # weight_rows: row r of a palette is position r % rest of its channel block r // rest.
    rest = numel // shape[0]
    channel = palette * (shape[0] // groups) + (rows // rest) * dim + element
    return channel * rest + rows % rest


def check_backend(backend) -> str:
    if backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
    return backend


def check_layer_options(shape: tuple, n_clusters, tau, dim, max_iter, epsilon, init_method,
                        group_size, enable_per_channel_scale=False, vector_axis="flat") -> int:
    """Validate the clustering options of a weight of `shape`; returns the number of palettes.

    Raises a ValueError naming the option (compress_model adds the layer's name).
    """
    check_count("n_clusters", n_clusters)
    check_count("dim", dim)
    check_count("max_iter", max_iter)
    if max_iter > MAX_ITER_LIMIT:
        raise ValueError(f"max_iter={max_iter} is above the op's limit MAX_ITER_LIMIT = "
                         f"{MAX_ITER_LIMIT} (DKM converges in a few iterations; the paper runs "
                         f"5): use max_iter <= {MAX_ITER_LIMIT}")
    if (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))
            or not math.isfinite(epsilon) or epsilon < 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if init_method not in INIT_METHODS:
        raise ValueError(f"init_method must be one of {INIT_METHODS}, got {init_method!r}")
    if tau != "auto" and (isinstance(tau, bool) or not isinstance(tau, (int, float))
                          or not math.isfinite(tau) or tau <= 0):
        raise ValueError(f"tau must be a number > 0 or 'auto', got {tau!r}")
    check_bool("enable_per_channel_scale", enable_per_channel_scale)
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
    if vector_axis not in VECTOR_AXES:
        raise ValueError(f"vector_axis must be one of {VECTOR_AXES}, got {vector_axis!r}")
    if vector_axis == "output" and (out_channels // groups) % dim:
        raise ValueError(f"dim={dim} does not divide the {out_channels // groups} output channels "
                         f"of each palette (vector_axis='output' takes {dim} consecutive output "
                         f"channels); use a dim dividing it, or vector_axis='flat'")
    history = (max_iter + 1) * groups * n_clusters * dim * torch.float32.itemsize
    if history > MAX_CENTROID_HISTORY_BYTES:
        most = MAX_CENTROID_HISTORY_BYTES // (groups * n_clusters * dim * torch.float32.itemsize)
        raise ValueError(
            f"max_iter={max_iter} would keep {history / 2**30:.1f} GiB of centroids for backward "
            f"(max_iter + 1 sets of {groups} x {n_clusters} x {dim} floats; the limit is "
            f"MAX_CENTROID_HISTORY_BYTES = {MAX_CENTROID_HISTORY_BYTES / 2**30:g} GiB): use "
            f"max_iter <= {most - 1}")
    return groups


_NOT_FINITE = ("the weight contains NaN or Inf; the centroids cannot be initialised from it "
               "(check the loaded or trained values)")


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes forwards); never
    inside a compiled graph, which torch.compile builds from a forward."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of `device` on the host costs no wait (the CPU's own memory)."""
    return device.type == "cpu"


def keep_saved(tensor: Tensor) -> Tensor:
    """A saved-tensors hook that keeps a clustering's saved tensors as they are: gradient
    checkpointing must not count them (a recomputed read clusters again)."""
    return tensor


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
        lut_quantization: None, or "int8" / "uint8": snapping stores each palette as 8-bit
            integers times a per-palette scale in lut_dtype (dkm_kernels.snapping.quantize_palette,
            coremltools' symmetric LUT quantization). Training is unchanged (as in coremltools'
            DKMPalettizer): the centroids stay float32 until snapping.
        vector_axis: "flat" (d consecutive weights of the flattened weight) or "output" (d
            consecutive output channels at the same position); see the module doc.
        generator / seed: the source of the initialisation's random numbers (seed builds a
            generator on the weight's device).
        keep_weight: hold `weight_tensor` as `self.weight`, so that `layer()` clusters it (the
            public implementation's behaviour); `compress_model` passes False, since
            parametrize owns the weight there.
        lazy_init: leave the centroids unset until the first clustered call (they are then
            computed from the weight of that moment). A weight on the meta device always waits.
        auto_advance: every training call first commits the previous call's centroids as its
            warm start (the public implementation's behaviour). `compress_model` passes False and
            calls `advance()` once per model forward, so that a forward recomputed by gradient
            checkpointing starts from the same centroids as the original.
        name: the layer's name in error messages (compress_model passes the module's name).
        process_group: the torch.distributed group the model trains across (DDP's, or the FSDP2
            mesh's `mesh.get_group()`); every rank must hold the same weight in forward (DDP's
            replica, FSDP2's all-gathered parameter). The initial centroids and auto tau are
            computed on the group's first rank and broadcast, so every rank starts alike. A
            `weight_tensor` sharded by rows (an FSDP2 DTensor) is not gathered: they are computed
            from a sample of at most distributed.INIT_SAMPLE_ROWS rows per palette drawn from
            every shard (and broadcast over the shards' group when process_group is None).
        shard_rows: with process_group, each rank clusters only its share of the rows
            (distributed.split_sizes) with `dkm(..., process_group=)`, and the clustered rows are
            all-gathered: 1/R of the clustering work per rank, for one all-gather of the clustered
            weight forward and one reduce-scatter of its gradient backward.
        uniquify: with dim=1 and a float16/bfloat16 weight, cluster its distinct values with
            their counts (docs/design.md §10): the same result up to the order of summation, at
            O(M + U k) per pass instead of O(M k). False runs the op on every weight.
            "bfloat16": as True, and a float32 weight with dim=1 is clustered through its bfloat16
            rounding (an approximation: the clustering sees the rounded weight, and the soft
            weight and its gradient come back rounded to bfloat16; dkm_kernels.dkm).

    State: `centroids` is the committed warm start; a training call records its final centroids
    in `pending_centroids`, and `advance()` commits them. Both are buffers, so a state dict taken
    between steps resumes exactly.
    """

    def __init__(self, weight_tensor: Tensor, n_clusters: int = 16,
                 tau: float | str = DEFAULT_TAU, dim: int = 1, max_iter: int = DEFAULT_MAX_ITER,
                 epsilon: float = DEFAULT_EPSILON,
                 init_method: str = "kmeans++", backend: str = "auto",
                 group_size: int | None = None, enable_per_channel_scale: bool = False,
                 lut_dtype: torch.dtype = torch.float16, vector_axis: str = "flat",
                 lut_quantization: str | None = None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 keep_weight: bool = True, lazy_init: bool = False, auto_advance: bool = True,
                 name: str | None = None, process_group=None, shard_rows: bool = False,
                 uniquify: bool | str = True, _groups: int | None = None):
        super().__init__()
        if not isinstance(weight_tensor, Tensor):
            raise TypeError(f"weight_tensor must be a torch.Tensor, "
                            f"got {type(weight_tensor).__name__}")
        self.name = name
        if _groups is None:  # compress_model passes the count after validating the options itself
            with self._naming_errors():
                _groups = check_layer_options(
                    tuple(weight_tensor.shape), n_clusters, tau, dim, max_iter, epsilon,
                    init_method, group_size, enable_per_channel_scale, vector_axis)
                check_backend(backend)
                check_lut_dtype(lut_dtype)
                check_seed(seed)
                for flag, value in (("keep_weight", keep_weight), ("lazy_init", lazy_init),
                                    ("auto_advance", auto_advance), ("shard_rows", shard_rows)):
                    check_bool(flag, value)
                check_uniquify(uniquify)
                distributed.check_group(process_group)
        self.n_clusters = n_clusters
        self.dim = dim
        self.max_iter = max_iter
        self.epsilon = float(epsilon)
        self.init_method = init_method
        self.backend = backend
        self.group_size = group_size
        self.groups = _groups
        self.enable_per_channel_scale = enable_per_channel_scale
        self.lut_dtype = lut_dtype
        with self._naming_errors():
            self.lut_quantization = check_lut_quantization(lut_quantization)
        self.vector_axis = vector_axis
        self.original_shape = tuple(weight_tensor.shape)
        self.n_vectors = weight_tensor.numel() // dim
        self.auto_tau = tau == "auto"
        self.auto_advance = auto_advance
        self.process_group = process_group
        self.shard_rows = shard_rows and process_group is not None
        self.uniquify = uniquify
        # Compress_model switches this off before its milestone step: the weight passes unchanged.
        self.active = True
        # A meta weight has no values to draw from: its generator lives on the CPU until the
        # weights are real (initialize() moves the stream to their device).
        device = torch.device("cpu") if weight_tensor.is_meta else weight_tensor.device
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        self.generator = generator
        if keep_weight:
            self.weight = weight_tensor

        shape = (n_clusters, dim) if _groups == 1 else (_groups, n_clusters, dim)
        buffers = dict(dtype=torch.float32, device=weight_tensor.device)
        self.register_buffer("centroids", torch.zeros(shape, **buffers))
        self.register_buffer("pending_centroids", torch.zeros(shape, **buffers))
        # tau (an auto tau is only known after initialisation) is saved with the checkpoint;
        # float32: buffers must move to any device, MPS included.
        self.register_buffer("tau_value", torch.tensor(float("nan") if self.auto_tau else tau,
                                                       **buffers))
        self.register_buffer("initialized", torch.tensor(False, device=weight_tensor.device))
        # Host-side mirrors of the buffers above, so that a forward never reads a device value
        # (a fixed tau stays an exact Python float); refreshed whenever the buffers are loaded.
        self._initialized = False
        self._tau = float("nan") if self.auto_tau else float(tau)
        self._has_pending = False
        # The clustered weight of the current model forward (see cache_key); compress_model's
        # hooks switch it on for the duration of each forward.
        self.caching = False
        self._cache: tuple | None = None
        # The evaluation-mode (hard) weight, kept until the weight or the centroids change
        # (see _cached_hard_weight), so that evaluating before snapping costs what it costs after.
        self._hard_cache: tuple | None = None
        if not lazy_init and not weight_tensor.is_meta:
            self.initialize(weight_tensor)

    # -- layout -----------------------------------------------------------------------------------

    @property
    def tau(self) -> float:
        return self._tau

    @property
    def bits(self) -> int:
        """Bits of one palette index."""
        return max(1, math.ceil(math.log2(self.n_clusters)))

    @property
    def is_initialized(self) -> bool:
        """Whether the centroids hold values (host-side: no device read)."""
        return self._initialized

    def _naming_errors(self):
        return ErrorPrefix(self._where())

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
        return weight_rows(weight, self.groups, self.dim, self.vector_axis)

    def _grouped_centroids(self) -> Tensor:
        return self.centroids if self.groups > 1 else self.centroids.unsqueeze(0)

    # -- state ------------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, weight: Tensor | None = None) -> None:
        """Seed the centroids (and tau, when "auto") from `weight` (default: self.weight)."""
        weight = self._weight_or(weight).detach()
        if weight.is_meta:
            raise ValueError(self._where() + "the weight is on the meta device and has no values "
                             "to initialise the centroids from; move the model to a real device "
                             "(model.to_empty(device=...)) and load its weights first")
        generator = self.generator
        if generator is not None and generator.device.type != weight.device.type:
            # The model moved since the generator was made: continue its stream on the new device.
            seed = int(torch.randint(SEED_BOUND, (), generator=generator,
                                     device=generator.device))
            generator = self.generator = torch.Generator(device=weight.device).manual_seed(seed)
        group, counts = self.process_group, None
        if distributed.is_sharded(weight):  # FSDP2's shard: a sample of every rank's rows
            rows, group = self._sampled_rows(weight, generator, group)
        else:
            if not bool(torch.isfinite(weight).all()):  # once per layer: a sync is fine here
                raise ValueError(self._where() + _NOT_FINITE)
            rows = self.rows(self.normalized(weight)[0])
            if self.uniquify and unique.applies(rows):
                # The distinct values with their counts stand for the weights: O(U k), not O(M k).
                found = unique.distinct(rows)
                rows, counts = found.values, found.counts
        rows = rows.float()
        if counts is not None and self.init_method == "kmeans++":
            centroids = kmeans_plus_plus(rows, self.n_clusters, generator, counts=counts)
        else:
            full = rows if counts is None else self.rows(self.normalized(weight)[0]).float()
            centroids = init_centroids(full, self.n_clusters, self.init_method, generator)
        if self.auto_tau:
            nearest = nearest_centroids(rows, centroids)
            chosen = torch.gather(centroids, 1, nearest.unsqueeze(-1).expand(-1, -1, self.dim))
            distance = (rows - chosen).square().sum(-1)
            mean_sq = (distance.mean() if counts is None
                       else (distance * counts).sum() / counts.sum()).item()
            self._tau = max(AUTO_TAU_FRACTION * mean_sq, MIN_AUTO_TAU)
        if group is not None:  # every rank starts from the first rank's
            distributed.broadcast_(centroids, group)
            if self.auto_tau:
                tau = torch.tensor(self._tau, dtype=torch.float64, device=centroids.device)
                self._tau = float(distributed.broadcast_(tau, group))
        self.tau_value.fill_(self._tau)
        self._store_centroids(centroids)
        self.initialized.fill_(True)
        self._initialized = True

    def _sampled_rows(self, weight: Tensor, generator, group) -> tuple[Tensor, object]:
        """(G, S, d): S rows of every palette of a weight split by rows across ranks (an FSDP2
        DTensor), the same on every rank, without gathering the weight: the group's first rank
        draws the rows (all of them when a palette has at most INIT_SAMPLE_ROWS), and each rank
        contributes the elements it holds (distributed.sample_rows). Also the group to broadcast
        the initialisation over: `group`, or the one the weight is split across."""
        local, position, shards = distributed.shard_of(weight)
        if not distributed.all_finite(local, shards):
            raise ValueError(self._where() + _NOT_FINITE)
        per_palette = self.n_vectors // self.groups
        count = min(per_palette, distributed.INIT_SAMPLE_ROWS)
        if count == per_palette:
            picked = torch.arange(count, device=local.device).expand(self.groups, count)
        else:  # with replacement: O(S) whatever the weight's size; k-means++ takes repeats
            picked = torch.randint(per_palette, (self.groups, count), generator=generator,
                                   device=local.device)
            distributed.broadcast_(picked, shards)
        elements = row_elements(self.original_shape, self.groups, self.dim, self.vector_axis,
                                picked)
        # A scale is per output channel, and a split along dim 0 keeps each channel on one rank.
        sample = distributed.sample_rows(self.normalized(local)[0], position, elements, shards)
        return sample, shards if group is None else group

    def _store_centroids(self, centroids: Tensor) -> None:
        """`centroids` become the stored ones and the next call's warm start: nothing is left
        pending and no cached output of the old ones survives."""
        self.centroids.copy_(centroids.reshape(self.centroids.shape))
        self.pending_centroids.copy_(self.centroids)
        self._has_pending = False
        self._cache = None

    @torch.no_grad()
    def advance(self) -> None:
        """Commit the centroids of the last training call as the warm start of the next one."""
        if self._has_pending:
            self.centroids.copy_(self.pending_centroids)
            self._has_pending = False
        self._cache = None

    def _settled(self) -> None:
        """A standalone layer's readers see its last call's centroids (commits them)."""
        if self.auto_advance:
            self.advance()

    def _weight_or(self, weight: Tensor | None) -> Tensor:
        if weight is not None:
            return weight
        if "weight" not in self.__dict__ and "weight" not in self._parameters:
            raise ValueError(self._where() + "this DKMLayer holds no weight (keep_weight=False): "
                             "pass one")
        return self.weight

    def _settled_weight(self, weight: Tensor | None) -> Tensor:
        """What the readers of the stored centroids start with: the weight to read (_weight_or),
        then the last call's centroids committed (_settled)."""
        weight = self._weight_or(weight)
        self._settled()
        return weight

    def _where(self) -> str:
        return "" if self.name is None else f"layer {self.name!r}: "

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        pending = prefix + "pending_centroids"
        if prefix + "centroids" not in state_dict:
            # A plain model's state dict (no DKM state): the centroids will be initialised from
            # the weights it loads, at the first use.
            self._initialized = False
            self._tau = float("nan") if self.auto_tau else self._tau
            with torch.no_grad():
                self.initialized.fill_(False)
            self._cache = None
            return
        if pending not in state_dict:
            # A checkpoint written before pending centroids were kept: nothing is pending.
            state_dict[pending] = state_dict[prefix + "centroids"]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not self.initialized.is_meta:  # loading is rare: reading the device here is fine
            self._initialized = bool(self.initialized)
            if self.auto_tau:
                self._tau = float(self.tau_value)
            self._has_pending = True  # committing pending == centroids changes nothing
        self._cache = None

    def _apply(self, fn, recurse=True):
        # model.half() / .to(torch.bfloat16) would round the centroids each step and stall their
        # small moves: they stay float32 wherever the model goes (only their device follows).
        kept = {id(self._buffers[key]) for key in ("centroids", "pending_centroids", "tau_value")}

        def keep_float32(tensor):
            moved = fn(tensor)
            if id(tensor) in kept and moved.dtype != tensor.dtype:
                return tensor.to(device=moved.device)
            return moved

        result = super()._apply(keep_float32, recurse)
        # to_empty() leaves the buffers uninitialised memory: restore them from the mirrors.
        with torch.no_grad():
            self.initialized.fill_(self._initialized)
            self.tau_value.fill_(self._tau)
        self._cache = self._hard_cache = None
        return result

    # -- clustering -------------------------------------------------------------------------------

    def cache_key(self, weight: Tensor) -> tuple:
        """What the clustered weight depends on: the weight's storage and version, the centroids',
        the mode and whether autograd records (a no-grad result cannot serve a graph)."""
        return (weight.data_ptr(), weight._version, weight.dtype, weight.device,
                self.centroids.data_ptr(), self.centroids._version, self.training,
                torch.is_grad_enabled())

    def forward(self, weight: Tensor | None = None,
                weight_override: Tensor | None = None) -> Tensor:
        """The clustered weight: soft DKM in training, nearest stored centroid in evaluation.

        `weight_override` is the public implementation's name for the same argument.
        """
        weight = self._weight_or(weight if weight is not None else weight_override)
        if not self.active or weight.is_meta:
            return weight
        if tuple(weight.shape) != self.original_shape:
            raise ValueError(f"{self._where()}weight has shape {tuple(weight.shape)}, this layer "
                             f"clusters {self.original_shape}")
        if self.auto_advance:
            self.advance()
        # Only within a model forward, never while backward recomputes one: a recomputed read must
        # build its own graph (reentrant checkpointing backpropagates through it separately).
        use_cache = (self.caching and not torch.compiler.is_compiling()
                     and not _in_backward())
        if use_cache:
            key = self.cache_key(weight)
            if self._cache is not None and self._cache[0] == key:
                _, clustered, pending = self._cache
                if pending is not None:  # clustered in the step's batch: now it counts as read
                    self._keep_pending(pending)
                    self._cache = (key, clustered, None)
                return clustered
        if not self._initialized:
            self.initialize(weight)
        if self.training:
            self._hard_cache = None  # training moves the centroids: free the evaluation weight
            if torch.compiler.is_compiling():  # no cache there, and the hooks do not trace
                clustered = self._soft_weight(weight)
            else:
                # Checkpointing must not count this clustering's saved tensors: a read served
                # from the cache in the forward runs the clustering again when backward
                # recomputes it.
                with torch.autograd.graph.saved_tensors_hooks(keep_saved, keep_saved):
                    clustered = self._soft_weight(weight)
        else:
            clustered = self._cached_hard_weight(weight)
        if use_cache:
            self._cache = (self.cache_key(weight), clustered, None)
        return clustered

    def _soft_problem(self, weight: Tensor) -> tuple[DKMProblem, Tensor | None]:
        """The training clustering of `weight`: the op's problem (rows of the normalised weight,
        the warm start, tau, max_iter, epsilon) and the channel scale to apply after."""
        normalized, scale = self.normalized(weight)
        centroids = self._grouped_centroids()
        if normalized.dtype == torch.float64:
            centroids = centroids.double()
        return DKMProblem(self.rows(normalized), centroids, self._tau, self.max_iter,
                          self.epsilon), scale

    def _soft_weight(self, weight: Tensor) -> Tensor:
        problem, scale = self._soft_problem(weight)
        rows = problem.weights
        group = self.process_group if self.shard_rows else None
        with self._naming_errors():
            result = dkm(rows if group is None else distributed.local_rows(rows, group),
                         *problem[1:], backend=self.backend, process_group=group,
                         uniquify=self.uniquify)
        self._keep_pending(result.centroids)
        clustered = result.weights
        if group is not None:
            clustered = distributed.gather_rows(clustered, rows.shape[1], group)
        return self._from_rows(clustered, weight, scale)

    def _keep_pending(self, centroids: Tensor) -> None:
        with torch.no_grad():  # committed by advance(): the warm start of the next step
            self.pending_centroids.copy_(centroids.reshape(self.centroids.shape))
        self._has_pending = True

    def _from_rows(self, clustered: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor:
        clustered = rows_to_weight(clustered, weight.shape, self.vector_axis)
        return clustered if scale is None else clustered * scale.to(clustered.dtype)

    # -- many layers in one call (the compressor's step) -----------------------------------------

    def batched_problem(self, weight: Tensor) -> tuple[DKMProblem, Tensor | None] | None:
        """This training step's clustering of `weight` as a `dkm_many` problem (with the channel
        scale), for a caller that clusters many layers in one call and hands each result back
        with `take_batched`; None where the layer clusters on its own: outside a cached training
        step, inactive, already clustered this step, uniquified, rows sharded across ranks."""
        if not (self.active and self.training and self.caching and torch.is_grad_enabled()) \
                or torch.compiler.is_compiling() or _in_backward() or weight.is_meta \
                or distributed.is_sharded(weight) \
                or (self.process_group is not None and self.shard_rows) \
                or tuple(weight.shape) != self.original_shape \
                or (self._cache is not None and self._cache[0] == self.cache_key(weight)):
            return None
        if not self._initialized:
            self.initialize(weight)
        problem, scale = self._soft_problem(weight)
        if uniquified(problem.weights, self.backend, self.uniquify):
            return None
        return problem, scale

    def take_batched(self, weight: Tensor, result, scale: Tensor | None) -> None:
        """Serves this step's reads of `weight` from `result` (a DKMResult of `batched_problem`'s
        problem); its centroids become pending at the first read, as if clustered then."""
        self._cache = (self.cache_key(weight), self._from_rows(result.weights, weight, scale),
                       result.centroids)

    @torch.no_grad()
    def _nearest(self, weight: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Nearest stored centroid of every (normalised) weight vector, the channel scale, and
        which vectors are finite.

        A NaN or Inf weight has no nearest centroid: on the CPU (where reading the flag costs
        nothing) that raises; elsewhere the affected vectors come out NaN instead of a palette
        entry, without waiting for the device.
        """
        if not self._initialized:
            self.initialize(weight)
        normalized, scale = self.normalized(weight)
        indices, finite = nearest_centroids_checked(self.rows(normalized),
                                                    self._grouped_centroids())
        if _reads_are_free(weight.device) and not bool(finite.all()):
            raise ValueError(self._where() + "the weight contains NaN or Inf, which has no nearest "
                             "palette entry (check the loaded or trained values)")
        return indices, scale, finite

    @torch.no_grad()
    def get_assignments(self, weight: Tensor | None = None) -> Tensor:
        """Index of the nearest stored centroid of every weight vector: (M,) or (G, M) int64."""
        indices, _, finite = self._nearest(self._settled_weight(weight))
        if not bool(finite.all()):  # indices leave the device anyway: this read is free
            raise ValueError(self._where() + "the weight contains NaN or Inf, which has no "
                             "nearest palette entry")
        return indices[0] if self.groups == 1 else indices

    def get_codebook(self) -> Tensor:
        """The centroids, (k, d) or (G, k, d), fp32 (a copy)."""
        self._settled()
        return self.centroids.clone()

    def _hard_weight_key(self, weight: Tensor) -> tuple:
        """What the hard weight depends on: the weight (the same tensor, unmodified: its version
        counts in-place updates such as an optimizer's), the centroids (their version counts
        every copy into them: a training step, a loaded state dict, initialisation), dtype and
        device."""
        return (weight.data_ptr(), weight._version, weight.dtype, weight.device,
                self.centroids.data_ptr(),
                self.centroids._version, self._initialized)

    def _cached_hard_weight(self, weight: Tensor) -> Tensor:
        """hard_weight(weight), computed once until the weight or the centroids change."""
        if torch.compiler.is_compiling():
            return self.hard_weight(weight)
        self._settled()
        if self._hard_cache is not None:
            ref, key, value = self._hard_cache
            if ref() is weight and key == self._hard_weight_key(weight):
                return value
        value = self.hard_weight(weight)
        self._hard_cache = (weakref.ref(weight), self._hard_weight_key(weight), value)
        return value

    @torch.no_grad()
    def hard_weight(self, weight: Tensor | None = None) -> Tensor:
        """Every weight vector replaced by its nearest stored centroid (and rescaled)."""
        weight = self._settled_weight(weight)
        indices, scale, finite = self._nearest(weight)
        centroids = self._grouped_centroids()
        values = torch.gather(centroids, 1, indices.unsqueeze(-1).expand(-1, -1, self.dim))
        if not _reads_are_free(weight.device):
            values = torch.where(finite.unsqueeze(-1), values, float("nan"))
        values = rows_to_weight(values, weight.shape, self.vector_axis)
        if scale is not None:
            values = values * scale
        return values.to(weight.dtype)

    @torch.no_grad()
    def fit_kmeans(self, weight: Tensor | None = None, iterations: int = 50) -> None:
        """Post-training palettization: hard k-means (Lloyd) from the stored centroids."""
        weight = self._settled_weight(weight)
        if not self._initialized:
            self.initialize(weight)
        rows = self.rows(self.normalized(weight)[0])
        fitted = lloyd_kmeans(rows, self._grouped_centroids(), iterations)
        self._store_centroids(fitted)

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
        if self.vector_axis != "flat":
            text += f", vector_axis={self.vector_axis!r}"
        if self.lut_quantization is not None:
            text += f", lut_quantization={self.lut_quantization!r}"
        return text
