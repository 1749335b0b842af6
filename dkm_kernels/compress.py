"""`compress_model` and `DKMCompressor`: DKM on every Conv / Linear / Embedding weight of a model.

Each clustered weight gets a `DKMLayer` registered with `torch.nn.utils.parametrize`: the module's
`weight` becomes the clustered weight, the trainable float weight lives on as
`<module>.parametrizations.weight.original`, and the layer's centroids are buffers next to it. So
`model.parameters()`, optimizers and `state_dict()` work as usual, and a state dict saved during
training resumes it exactly (warm-start and pending centroids, auto taus and the step counter
included). A Parameter shared by several modules (a tied embedding and output head) gets one
DKMLayer, registered on each of them (`DKMCompressor.tied`).

Per-layer configuration, most specific first:
  1. `layer_configs[module_name]`: a config, or None to leave that module uncompressed;
  2. `module_name_configs[pattern]`: the first regular expression that matches the whole name;
  3. the small-layer rule: a weight with fewer than `small_layer_threshold` elements gets
     `small_layer_config` (the paper's protocol: 8-bit scalar, k=256, d=1);
  4. `module_type_configs[type]` (a module class or its name, such as "Conv2d");
  5. `conv_config` for Conv1d/2d/3d, `fc_config` for Linear, `embedding_config` for Embedding;
  6. the defaults given as arguments (bits, dim, tau, group_size, ...).
A config is a dict with any of the keys of `LayerConfig` (and "weight_threshold"), or a string
"bits/dim" ("6/8"). A weight with at most `weight_threshold` elements is left uncompressed unless
`layer_configs` names it; in module_name_configs and module_type_configs a list of configs picks
the one with the largest weight_threshold below the weight's size (coremltools' rule).
With `skip_first_last`, the first and last eligible modules (in registration order) are left
uncompressed unless `layer_configs` names them. `target="coreml"` checks that every clustered
layer can be deployed to Core ML (dkm_kernels.coreml) before anything is trained.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import coreml, distributed, export
from .functional import dkm_many
from .layer import (DEFAULT_EPSILON, DEFAULT_MAX_ITER, DEFAULT_TAU, DKMLayer, _in_backward,
                    check_backend, check_bool, check_layer_options, check_lut_dtype,
                    check_lut_quantization, check_seed, check_uniquify, keep_saved)
from .init import SEED_BOUND
from .modules import clusterable_modules, clusterable_type, layer_type, raw_weight
from .packing import MAX_BITS

try:
    from tqdm.auto import tqdm
except ImportError:  # the progress bar is optional
    tqdm = None


# The paper's protocol for small layers: weights with fewer elements than the threshold are cheap
# to keep precise, so they get 8-bit scalar palettes whatever the model's config.
SMALL_LAYER_THRESHOLD = 10_000
SMALL_LAYER_CONFIG = {"bits": 8, "dim": 1, "group_size": None}

# Weight elements clustered in one dkm_many call at most: until its backward a call holds its
# layers' upstream gradients and gradient accumulators (compute dtype) at once, which this bounds
# (about 512 MB in float32) whatever the model's size.
BATCH_MAX_ELEMENTS = 2**26


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """How one weight is clustered. bits: log2 of the palette size k; dim: weights per vector."""

    bits: int = 4
    dim: int = 1
    tau: float | str = DEFAULT_TAU
    group_size: int | None = None
    enable_per_channel_scale: bool = False
    max_iter: int = DEFAULT_MAX_ITER
    epsilon: float = DEFAULT_EPSILON
    init_method: str = "kmeans++"
    vector_axis: str = "flat"
    # None: palettes in lut_dtype; "int8" / "uint8": 8-bit entries times a per-palette scale.
    lut_quantization: str | None = None

    @property
    def n_clusters(self) -> int:
        return 2 ** self.bits

    @property
    def notation(self) -> str:
        """The paper's bits/dim notation."""
        return f"{self.bits}/{self.dim}"


CONFIG_KEYS = tuple(field.name for field in dataclasses.fields(LayerConfig))
# A config may also say which weights it is for (not a clustering option: resolved away).
SELECTION_KEYS = ("weight_threshold",)
TARGETS = (None, "coreml")


def parse_config(text: str) -> dict:
    """ "6/8" -> {"bits": 6, "dim": 8}; "3" -> {"bits": 3}."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:/\s*(\d+)\s*)?", text)
    if not match:
        raise ValueError(f"a config string is 'bits/dim' such as '6/8', got {text!r}")
    config = {"bits": int(match.group(1))}
    if match.group(2) is not None:
        config["dim"] = int(match.group(2))
    return config


def parse_model_config(text: str) -> dict[str, dict]:
    """The paper's notation: "cv:6/8,fc:6/4" -> {"cv": {...}, "fc": {...}} (also "emb:...")."""
    parts = {}
    for item in filter(None, (piece.strip() for piece in text.split(","))):
        kind, _, spec = item.partition(":")
        kind = kind.strip().lower()
        if kind not in ("cv", "fc", "emb") or not spec:
            raise ValueError(
                f"config must look like 'cv:6/8,fc:6/4' (kinds cv, fc, emb), got {text!r}")
        parts[kind] = parse_config(spec)
    return parts


def _as_dict(config, where: str) -> dict:
    if config is None:
        return {}
    if isinstance(config, str):
        return parse_config(config)
    if isinstance(config, LayerConfig):
        return dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: a config is a dict or a 'bits/dim' string, got {config!r}")
    unknown = sorted(set(config) - set(CONFIG_KEYS + SELECTION_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; "
                         f"the options are {list(CONFIG_KEYS + SELECTION_KEYS)}")
    threshold = config.get("weight_threshold", 0)
    if not _is_int(threshold) or threshold < 0:
        raise ValueError(f"{where}: weight_threshold must be an integer >= 0, got {threshold!r}")
    return dict(config)


def _config_choices(value, where: str) -> list[dict] | None:
    """A module_name_configs / module_type_configs value: None (leave uncompressed), or its
    configs as dicts, largest weight_threshold first."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{where}: an empty list; give a config, a list of configs or None")
    configs = [_as_dict(item, where) for item in items]
    return sorted(configs, key=lambda c: c.get("weight_threshold", 0), reverse=True)


def _pick(choices: list[dict], numel: int, default_threshold: int) -> dict | None:
    """The config of the largest weight_threshold that the weight's size exceeds, if any."""
    for choice in choices:
        if numel > choice.get("weight_threshold", default_threshold):
            return choice
    return None


def _type_choices(module_type_configs, module: nn.Module):
    """module_type_configs' entry for `module` (its class, or its class's name), or absent."""
    cls = type(module)
    for key in (cls, cls.__name__):
        if key in module_type_configs:
            return True, module_type_configs[key]
    return False, None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validated(name: str, config: dict, module: nn.Module) -> LayerConfig:
    """A LayerConfig for `module`, or a ValueError naming the layer and the option."""
    where = f"layer {name!r}"
    weight = raw_weight(module)
    bits = config["bits"]
    if not _is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{where}: bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")
    # The same checks DKMLayer makes, run before any layer is built so that a bad config leaves
    # the model untouched.
    try:
        check_layer_options(tuple(weight.shape), 2**bits, config["tau"], config["dim"],
                            config["max_iter"], config["epsilon"], config["init_method"],
                            config["group_size"], config["enable_per_channel_scale"],
                            config["vector_axis"])
        config = {**config,
                  "lut_quantization": check_lut_quantization(config["lut_quantization"])}
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return LayerConfig(**config)


def _dkm_parametrized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, DKMLayer) for p in module.parametrizations.weight)


def _weight_key(name: str, suffix: str = "weight") -> str:
    return f"{name}.{suffix}" if name else suffix


def _unsupported(module: nn.Module, config: dict) -> str | None:
    """Why `module` cannot be clustered with `config`, or None when it can."""
    if isinstance(module, nn.Embedding) and module.sparse:
        return ("sparse=True gradients: a parametrized weight gets dense gradients, so build the "
                "Embedding with sparse=False to cluster it")
    axis = clusterable_type(module).output_axis
    if axis != 0 and (config["group_size"] is not None or config["enable_per_channel_scale"]):
        return (f"{layer_type(module)} keeps its output channels on axis {axis} of its weight, "
                f"and group_size and per-channel scales follow axis 0: give it group_size=None "
                f"and enable_per_channel_scale=False to cluster it")
    if axis != 0 and config["vector_axis"] != "flat":
        return (f"{layer_type(module)} keeps its output channels on axis {axis} of its weight, "
                f"and vector_axis='output' follows axis 0: give it vector_axis='flat' to "
                f"cluster it")
    return None


class DKMCompressor(nn.Module):
    """A model whose clustered weights are DKM parametrizations (build it with `compress_model`).

    Call it like the model (or call the model itself). Each forward of the model in training mode
    is one step: it starts by committing every layer's pending centroids (`DKMLayer.advance`),
    so every read of a weight within the step, and every recomputation of it by gradient
    checkpointing, clusters from the same warm start, and a weight read twice is clustered once.
    Before `milestone` steps the weights train unclustered (in both modes), afterwards every
    clustered weight is soft-DKM in training and hard-assigned to its centroids in evaluation.
    `tied` maps a clustered layer to the other modules that share its Parameter (one DKMLayer).
    `process_group` and `shard_rows` go to every DKMLayer (see there and README "Distributed").
    """

    def __init__(self, model: nn.Module, configs: dict[str, LayerConfig],
                 skipped: dict[str, str], milestone: int = 0, backend: str = "auto",
                 lut_dtype: torch.dtype = torch.float16, seed: int | None = None,
                 tied: Mapping[str, list[str]] | None = None, process_group=None,
                 shard_rows: bool = True, uniquify: bool | str = True, progress: bool | None = None,
                 target: str | None = None, batch_layers: bool = True):
        super().__init__()
        if not _is_int(milestone) or milestone < 0:
            raise ValueError(f"milestone must be an integer >= 0, got {milestone!r}")
        check_backend(backend)
        check_lut_dtype(lut_dtype)
        check_seed(seed)
        check_bool("shard_rows", shard_rows)
        distributed.check_group(process_group)
        self.model = model
        self.process_group = process_group
        self.configs = dict(configs)
        self.skipped = dict(skipped)
        # clustered layer name -> the other modules holding the same Parameter (same DKMLayer)
        self.tied = {name: list(others) for name, others in (tied or {}).items() if others}
        self.milestone = milestone
        self.batch_layers = check_bool("batch_layers", batch_layers)
        self.lut_dtype = lut_dtype
        self.target = target  # "coreml": the layers were checked to deploy there
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))
        self._step = 0  # host mirror of `step`: a forward never reads the device
        self._depth = 0  # nested calls of the model's forward (only the outermost is a step)
        modules = dict(model.named_modules())
        already = [name for name in self.configs
                   for member in (name, *self.tied.get(name, ()))
                   if parametrize.is_parametrized(modules[member], "weight")]
        if already:  # checked before registering anything, so that the model is left untouched
            raise ValueError(f"layer(s) {already}: their weights are already parametrized (was "
                             f"the model compressed twice?); compress the original model once")
        # Already sharded by FSDP2: FSDP2 will swap its parameters where parametrize moves them.
        fsdp = distributed.fsdp_records(model)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        # Plain dicts: the layers and snapped records are reached through the model, not
        # registered a second time here.
        self.dkm_layers: dict[str, DKMLayer] = {}
        self.snapped: dict[str, Any] = {}
        check_uniquify(uniquify)
        for name, config in _progress(self.configs.items(), progress):
            weight = raw_weight(modules[name])
            layer_generator = generator
            # A meta weight initialises later, on the CPU, from the shared generator.
            if generator is not None and weight.device.type not in ("cpu", "meta"):
                layer_generator = torch.Generator(device=weight.device).manual_seed(
                    int(torch.randint(SEED_BOUND, (), generator=generator)))
            groups = 1 if config.group_size is None else weight.shape[0] // config.group_size
            group = process_group
            if group is None and distributed.is_sharded(weight):
                group = distributed.shard_of(weight)[2]  # the group FSDP2 shards it across
            layer = DKMLayer(
                weight, n_clusters=config.n_clusters, tau=config.tau, dim=config.dim,
                max_iter=config.max_iter, epsilon=config.epsilon,
                init_method=config.init_method, backend=backend,
                group_size=config.group_size,
                enable_per_channel_scale=config.enable_per_channel_scale,
                lut_dtype=lut_dtype, vector_axis=config.vector_axis,
                lut_quantization=config.lut_quantization, generator=layer_generator,
                keep_weight=False, lazy_init=milestone > 0, auto_advance=False, name=name,
                process_group=group, shard_rows=shard_rows, uniquify=uniquify, _groups=groups)
            # One layer for every module holding this Parameter: one palette, one DKM per forward.
            for member in (name, *self.tied.get(name, ())):
                # unsafe: registration would otherwise run the layer once (a DKM step) to check it.
                parametrize.register_parametrization(modules[member], "weight", layer,
                                                     unsafe=True)
                distributed.follow(fsdp, modules[member], "weight",
                                   modules[member].parametrizations.weight, "original")
            self.dkm_layers[name] = layer
        self._owners = {name: modules[name] for name in self.dkm_layers}
        self._set_active()
        # The step boundary is the model's forward, however it is called (the compressor, or
        # `model(x)` directly as training frameworks do).
        self._hooks = [model.register_forward_pre_hook(self._before_forward),
                       model.register_forward_hook(self._after_forward, always_call=True),
                       model.register_load_state_dict_pre_hook(self._plain_weight_keys)]

    # -- training ---------------------------------------------------------------------------------

    def _set_active(self) -> None:
        active = self._step >= self.milestone
        for name, layer in self.dkm_layers.items():
            layer.active = active and name not in self.snapped  # a snapped one passes through

    def _before_forward(self, module, args) -> None:
        """Starts a step: commits every layer's pending centroids, counts training calls."""
        if _in_backward():  # checkpointing recomputes a forward: the same step, the same start
            return
        self._depth += 1
        if self._depth > 1:
            return
        self._set_active()
        if module.training:
            self.step += 1
            self._step += 1
        for layer in self.dkm_layers.values():
            layer.advance()
            layer.caching = True
        if self.batch_layers and module.training and torch.is_grad_enabled():
            self._cluster_in_batches()

    def _cluster_in_batches(self) -> None:
        """Clusters the step's layers with `dkm_many`, a batch of neighbouring layers per call,
        each layer's reads then served from its result (DKMLayer.take_batched): one recurrence,
        and one host sync per iteration, for a whole batch (docs/design.md §12). Results equal
        one call per layer. Layers that cluster on their own (uniquified, sharded, compiled) are
        left to do so. On an error nothing is served, so that each layer reports its own."""
        batch, elements = [], 0
        for name, layer in self.dkm_layers.items():
            weight = raw_weight(self._owners[name])
            found = layer.batched_problem(weight)
            if found is None:
                continue
            if batch and (elements + weight.numel() > BATCH_MAX_ELEMENTS
                          or layer.backend != batch[0][0].backend):
                self._cluster_batch(batch)
                batch, elements = [], 0
            batch.append((layer, weight, *found))
            elements += weight.numel()
        if batch:
            self._cluster_batch(batch)

    @staticmethod
    def _cluster_batch(batch) -> None:
        try:
            with torch.autograd.graph.saved_tensors_hooks(keep_saved, keep_saved):
                results = dkm_many([problem for _, _, problem, _ in batch],
                                   backend=batch[0][0].backend)
        except (ValueError, TypeError):
            return
        for (layer, weight, _, scale), result in zip(batch, results):
            layer.take_batched(weight, result, scale)

    def _after_forward(self, module, args, output) -> None:
        if _in_backward():
            return
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return
        for layer in self.dkm_layers.values():
            layer.caching = False
            layer._cache = None

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def _plain_weight_keys(self, module, state_dict, prefix, *args) -> None:
        """A plain model's state dict loads too: `<name>.weight` is the parametrization's
        `original` (the layers' missing DKM state then initialises from the loaded weights)."""
        modules = dict(self.model.named_modules())
        for name in self.dkm_layers:
            for member in (name, *self.tied.get(name, ())):
                plain = prefix + _weight_key(member)
                if plain in state_dict and parametrize.is_parametrized(modules[member], "weight"):
                    original = prefix + _weight_key(member, "parametrizations.weight.original")
                    state_dict.setdefault(original, state_dict.pop(plain))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if not self.step.is_meta:
            self._step = int(self.step)  # loading is rare: reading the device here is fine
        self._set_active()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        with torch.no_grad():  # to_empty() leaves uninitialised memory: restore the mirror
            self.step.fill_(self._step)
        return result

    def get_layer(self, name: str) -> DKMLayer:
        if name not in self.dkm_layers:
            raise KeyError(f"{name!r} is not a clustered layer; clustered: {list(self.dkm_layers)}")
        return self.dkm_layers[name]

    @torch.no_grad()
    def fit_kmeans(self, iterations: int = 50) -> None:
        """Post-training palettization: hard k-means on the current weights (no training)."""
        modules = dict(self.model.named_modules())
        for name, layer in self.dkm_layers.items():
            layer.fit_kmeans(distributed.whole(raw_weight(modules[name])), iterations)

    # -- snapping and export ----------------------------------------------------------------------

    @torch.no_grad()
    def snap_weights(self) -> None:
        """Replace every clustered weight by its nearest palette entry, for good.

        Palettes are rounded to `lut_dtype` first (the dtype they are exported in), so the snapped
        weights are exactly what `export_compressed` encodes. Afterwards the model holds plain
        weights (the parametrizations are removed; the Parameter objects stay the same ones, so an
        optimizer still refers to them, and tied modules still share theirs). Calling it again
        does nothing. A weight sharded by FSDP2 is gathered to be snapped, and keeps its
        parametrization, now a pass-through of the snapped values: FSDP2 manages the parameter
        where parametrize put it.
        """
        modules = dict(self.model.named_modules())
        for name, layer in self.dkm_layers.items():
            if name in self.snapped:
                continue
            layer.advance()  # the centroids of the last training step
            module = modules[name]
            weight = raw_weight(module)
            # An FSDP2 shard is gathered: every rank snaps the whole weight alike.
            record = export.snap_layer(layer, distributed.whole(weight).detach(),
                                        self.configs[name], name=name)
            self.snapped[name] = record
            layer._hard_cache = None
            if distributed.is_sharded(weight):
                distributed.assign_whole(weight, record.decode())
                layer.active = False
                continue
            for member in (name, *self.tied.get(name, ())):
                if parametrize.is_parametrized(modules[member], "weight"):
                    parametrize.remove_parametrizations(modules[member], "weight",
                                                        leave_parametrized=False)
            module.weight.copy_(record.decode())

    @property
    def is_snapped(self) -> bool:
        return len(self.snapped) == len(self.dkm_layers)

    def export_compressed(self) -> dict:
        """The compressed model (snaps first if needed): see `dkm_kernels.export`."""
        return export.export_compressed(self)

    def save_compressed(self, path) -> dict:
        """Write `export_compressed()` to `path` with torch.save; returns the export."""
        return export.save_compressed(self, path)

    def get_compression_info(self) -> dict:
        """Per-layer bits and sizes and the whole model's compression ratio (dkm_kernels.export)."""
        return export.compression_info(self)

    # -- Core ML (dkm_kernels.coreml) ----------------------------------------------------------

    def finalize(self) -> nn.Module:
        """Snap, then attach the Core ML palettization metadata to the model (returned):
        coremltools.convert of the traced model then stores the learned palettes and indices."""
        return coreml.finalize(self)

    def to_coreml(self, example_inputs, path=None, **convert_kwargs):
        """finalize(), torch.jit.trace and coremltools.convert (minimum_deployment_target iOS18
        unless given); saves the ML program to `path` when given; returns the MLModel."""
        return coreml.to_coreml(self, example_inputs, path, **convert_kwargs)

    def extra_repr(self) -> str:
        return (f"milestone={self.milestone}, layers={len(self.dkm_layers)}, "
                f"lut_dtype={self.lut_dtype}")


def _progress(items, enabled: bool | None):
    """A tqdm bar over the layers being initialised (None: shown on a terminal only)."""
    if enabled is not None:
        check_bool("progress", enabled)
    if tqdm is None or enabled is False:
        return items
    return tqdm(list(items), desc="DKM: initialising layers", unit="layer",
                disable=None if enabled is None else False)


def compress_model(model: nn.Module, bits: int = 4, dim: int = 1,
                   tau: float | str = DEFAULT_TAU,
                   conv_config=None, fc_config=None, skip_first_last: bool = True, *,
                   config: str | None = None, embedding_config=None,
                   layer_configs: Mapping[str, Any] | None = None,
                   group_size: int | None = None, enable_per_channel_scale: bool = False,
                   small_layer_threshold: int = SMALL_LAYER_THRESHOLD, small_layer_config=None,
                   milestone: int = 0, max_iter: int = DEFAULT_MAX_ITER,
                   epsilon: float = DEFAULT_EPSILON,
                   init_method: str = "kmeans++", backend: str = "auto",
                   lut_dtype: torch.dtype = torch.float16,
                   lut_quantization: str | None = None,
                   seed: int | None = None, vector_axis: str = "flat",
                   module_name_configs: Mapping[str, Any] | None = None,
                   module_type_configs: Mapping[Any, Any] | None = None,
                   weight_threshold: int = 0, target: str | None = None, process_group=None,
                   shard_rows: bool = True, uniquify: bool | str = True,
                   progress: bool | None = None, batch_layers: bool = True) -> DKMCompressor:
    """Put DKM on the model's Conv1d/2d/3d, Linear and Embedding weights (the model is modified in
    place) and return the `DKMCompressor` that trains, snaps and exports it.

    bits, dim, tau, group_size, enable_per_channel_scale, max_iter, epsilon, init_method,
        vector_axis, lut_quantization: the defaults of every layer config. tau: a number > 0 or
        "auto"; vector_axis: "flat" or "output" (see dkm_kernels.layer); lut_quantization: None,
        "int8" or "uint8" (palettes snapped to 8-bit entries times a per-palette scale in
        lut_dtype, coremltools' quantized LUTs; training is unchanged).
    conv_config / fc_config / embedding_config: the configs of Conv, Linear and Embedding layers
        (dict or "bits/dim"); embedding_config defaults to fc_config.
    config: the paper's notation, "cv:6/8,fc:6/4" (sets conv_config and fc_config; "emb:..." too).
    layer_configs: {module name: config or None}; None leaves the module uncompressed.
    module_name_configs: {regular expression: config, list of configs, or None}; the first that
        matches a whole module name applies (as coremltools' module_name_configs).
    module_type_configs: {module class or class name: config, list of configs, or None}.
    weight_threshold: weights with at most this many elements stay uncompressed (0: none), unless
        layer_configs names them; a config's own "weight_threshold" overrides it.
    skip_first_last: leave the first and last eligible modules uncompressed.
    small_layer_threshold / small_layer_config: weights with fewer elements get this config
        (default 8-bit scalar, k=256, d=1); 0 turns the rule off.
    milestone: training steps (calls in training mode) before clustering starts; the centroids
        are then initialised from the weights of that moment.
    backend: the op's backend. lut_dtype: the dtype of exported palettes and scales.
    seed: seeds the centroid initialisation (None: torch's global generator).
    target: None, or "coreml" to raise, naming the layer, for any palette Core ML cannot hold
        (more than 8 bits, bfloat16 palettes, vectors it cannot lay out, quantized palettes with
        per-channel scales; dkm_kernels.coreml).
    process_group: the torch.distributed group the model trains across (DDP's, or an FSDP2
        mesh's `mesh.get_group()`; fully_shard may come before or after compress_model, and a
        weight already sharded defaults to its mesh's group). Every layer's initial centroids and
        auto tau are computed on the group's first rank and broadcast (from a sample of every
        shard's rows for a weight already sharded); with shard_rows, each rank clusters its share
        of every weight's rows and the clustered rows are all-gathered (README "Distributed
        training").
    uniquify: cluster float16/bfloat16 weights with dim=1 over their distinct values (exact up to
        the order of summation, O(M + U k) per pass; see DKMLayer). False: over every weight.
        "bfloat16": float32 weights with dim=1 too, through their bfloat16 rounding (an
        approximation; see dkm_kernels.dkm).
    progress: a tqdm progress bar over the layers while they initialise (True: always; None: when
        stderr is a terminal; False: never).
    batch_layers: each training step clusters its layers with `dkm_kernels.dkm_many`, batches of
        neighbouring layers up to BATCH_MAX_ELEMENTS weights per call (the same results as one
        call per layer, with one recurrence's host work and syncs per batch); False: one `dkm`
        call per layer as it is read, each layer's backward as soon as its gradient is ready.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None:
        parsed = parse_model_config(config)
        conv_config = parsed.get("cv", conv_config)
        fc_config = parsed.get("fc", fc_config)
        embedding_config = parsed.get("emb", embedding_config)
    defaults = _as_dict(dict(bits=bits, dim=dim, tau=tau, group_size=group_size,
                             enable_per_channel_scale=enable_per_channel_scale,
                             max_iter=max_iter, epsilon=epsilon, init_method=init_method,
                             vector_axis=vector_axis, lut_quantization=lut_quantization),
                        "defaults")
    by_kind = {
        "conv": _as_dict(conv_config, "conv_config"),
        "fc": _as_dict(fc_config, "fc_config"),
        "embedding": _as_dict(fc_config if embedding_config is None else embedding_config,
                              "embedding_config"),
    }
    small = _as_dict(SMALL_LAYER_CONFIG if small_layer_config is None
                     else small_layer_config, "small_layer_config")
    if not _is_int(small_layer_threshold) or small_layer_threshold < 0:
        raise ValueError(f"small_layer_threshold must be an integer >= 0, "
                         f"got {small_layer_threshold!r}")
    check_lut_dtype(lut_dtype)
    check_backend(backend)
    check_seed(seed)
    check_bool("skip_first_last", skip_first_last)
    if not _is_int(weight_threshold) or weight_threshold < 0:
        raise ValueError(f"weight_threshold must be an integer >= 0, got {weight_threshold!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    name_patterns = []
    for pattern, value in (module_name_configs or {}).items():
        where = f"module_name_configs[{pattern!r}]"
        try:
            compiled = re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"{where}: not a regular expression ({error})") from None
        name_patterns.append((compiled, _config_choices(value, where)))
    type_configs = {}
    for key, value in (module_type_configs or {}).items():
        if not isinstance(key, (str, type)):
            raise ValueError(f"module_type_configs: a key is a module class or its name (such as "
                             f"nn.Conv2d or 'Conv2d'), got {key!r}")
        type_configs[key] = _config_choices(value, f"module_type_configs[{key!r}]")

    candidates = clusterable_modules(model)
    lazy = [name for name, module in candidates
             if torch.nn.parameter.is_lazy(raw_weight(module))]
    if lazy:
        raise ValueError(f"model: module(s) {lazy} are lazy modules whose weights have no shape "
                         f"yet; run one forward pass with a sample batch before compress_model")
    compressed = [name for name, module in candidates if _dkm_parametrized(module)]
    if compressed:
        raise ValueError(f"model: module(s) {compressed} already carry DKM (was the model "
                         f"compressed twice?); compress the original model once")
    names = [name for name, _ in candidates]
    overrides = dict(layer_configs or {})
    unknown = [name for name in overrides if name not in names]
    if unknown:
        raise ValueError(
            f"layer_configs names module(s) {unknown} that are not clusterable modules of the "
            f"model; clusterable modules: {names}")

    configs: dict[str, LayerConfig] = {}
    skipped: dict[str, str] = {}
    tied: dict[str, list[str]] = {}
    owners: dict[int, str] = {}  # id of a weight Parameter -> the first module holding it
    for index, (name, module) in enumerate(candidates):
        owner = owners.setdefault(id(raw_weight(module)), name)
        if owner != name:  # a tied weight follows the first module that holds it
            if name in overrides and overrides[name] is None:
                skipped[name] = (f"layer_configs: None (it shares its weight with {owner!r}, and "
                                 f"reads it unclustered until snap_weights)")
                continue
            if name in overrides:
                raise ValueError(f"layer_configs[{name!r}]: {name!r} shares its weight with "
                                 f"{owner!r}, which decides how it is clustered; configure "
                                 f"{owner!r} instead")
            if owner in configs:
                tied.setdefault(owner, []).append(name)
            else:
                skipped[name] = f"shares its weight with {owner!r} ({skipped[owner]})"
            continue
        kind = clusterable_type(module).kind
        resolved = {**defaults, **by_kind[kind]}
        if name in overrides:
            if overrides[name] is None:
                skipped[name] = "layer_configs: None"
                continue
            resolved.update(_as_dict(overrides[name], f"layer_configs[{name!r}]"))
            resolved.pop("weight_threshold", None)  # named: clustered whatever its size
            reason = _unsupported(module, resolved)
            if reason is not None:  # named explicitly: a skip would go unnoticed
                raise ValueError(f"layer_configs[{name!r}]: {reason}")
        else:
            named = next(((compiled, choices) for compiled, choices in name_patterns
                          if compiled.fullmatch(name)), None)
            if named is not None:
                source, choices = f"module_name_configs[{named[0].pattern!r}]", named[1]
            else:
                found, choices = _type_choices(type_configs, module)
                source = f"module_type_configs[{type(module).__name__!r}]" if found else None
                choices = choices if found else [resolved]  # its own threshold, if any
            if choices is None:
                skipped[name] = f"{source}: None"
                continue
            if named is None and skip_first_last and index in (0, len(candidates) - 1):
                skipped[name] = "first layer" if index == 0 else "last layer"
                continue
            numel = raw_weight(module).numel()
            chosen = _pick(choices, numel, weight_threshold)
            if chosen is None:
                lowest = choices[-1].get("weight_threshold", weight_threshold)
                skipped[name] = f"weight_threshold: {numel} weights, not more than {lowest}"
                continue
            resolved.update(chosen)
            if named is None and numel < small_layer_threshold:
                resolved.update(small)
            resolved.pop("weight_threshold", None)
            reason = _unsupported(module, resolved)
            if reason is not None:
                skipped[name] = reason
                continue
        configs[name] = _validated(name, resolved, module)
    if target == "coreml":
        modules = dict(candidates)
        for name, layer_config in configs.items():
            coreml.check_deployable(name, modules[name], layer_config, lut_dtype)
    return DKMCompressor(model, configs, skipped, milestone=milestone, backend=backend,
                         lut_dtype=lut_dtype, seed=seed, tied=tied, target=target,
                         process_group=process_group, shard_rows=shard_rows, uniquify=uniquify,
                         progress=progress, batch_layers=batch_layers)
