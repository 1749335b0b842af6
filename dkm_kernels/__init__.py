"""dkm_kernels: memory-efficient Differentiable K-Means (DKM) weight clustering.

    dkm_kernels.dkm(weights, centroids, tau)   the op (functional.py), every backend behind it
    dkm_kernels.dkm_many(problems)             many problems (a model's layers) in one call
    dkm_kernels.init_centroids(...)            k-means++ / random warm starts (init.py)
    dkm_kernels.DKMLayer(weight, n_clusters)   one clustered weight (layer.py)
    dkm_kernels.compress_model(model, bits)    DKM on a whole model -> DKMCompressor (compress.py)
    dkm_kernels.load_compressed(path, model)   a plain model from an export (export.py)
    compressor.to_coreml(example_inputs, path) the learned palettes as a Core ML model (coreml.py)
    dkm_kernels.from_coremltools_config(cfg)   compress_model settings from a DKMPalettizerConfig
"""
from . import backends
from .functional import DKMProblem, DKMResult, dkm, dkm_many, vectorize
from .init import init_centroids, kmeans_plus_plus, random_rows
from .layer import DKMLayer
from .compress import DKMCompressor, LayerConfig, compress_model
from .export import export_compressed, load_compressed, save_compressed
from .coreml import from_coremltools_config
from .utils import print_compression_summary

backends.load_all()

__all__ = ["DKMResult", "DKMProblem", "dkm", "dkm_many", "vectorize", "init_centroids", "kmeans_plus_plus", "random_rows",
           "DKMLayer", "DKMCompressor", "LayerConfig", "compress_model", "export_compressed",
           "save_compressed", "load_compressed", "print_compression_summary",
           "from_coremltools_config"]
__version__ = "0.1.0"
