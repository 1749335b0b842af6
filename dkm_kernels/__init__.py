"""dkm_kernels: memory-efficient Differentiable K-Means (DKM) weight clustering.

    dkm_kernels.dkm(weights, centroids, tau)   the op (functional.py), every backend behind it
    dkm_kernels.init_centroids(...)            k-means++ / random warm starts (init.py)
"""
from . import backends
from .functional import DKMResult, dkm, vectorize
from .init import init_centroids, kmeans_plus_plus, random_rows

backends.load_all()

__all__ = ["DKMResult", "dkm", "vectorize", "init_centroids", "kmeans_plus_plus", "random_rows"]
__version__ = "0.1.0"
