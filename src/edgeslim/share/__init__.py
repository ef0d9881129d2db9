"""Parameter sharing and factorization: weight clustering, compact storage, cross-layer tying, low-rank layers.

>>> c = edgeslim.share.cluster(model, ClusterConfig(clusters=32))          # k-means codebook per layer
>>> c = edgeslim.train.fit(c, train, val, TrainConfig(epochs=1)).model     # fine-tune the shared centroids
>>> edgeslim.share.save_compressed(c, "model.eslz")                       # codebooks + entropy-coded indices
>>> dense = edgeslim.share.load_compressed("model.eslz", model)           # exact dense weights back
>>> t = edgeslim.share.tie_layers(model, TieConfig(auto=True))             # ALBERT-style shared blocks
>>> f = edgeslim.share.factorize(model, FactorizeConfig(method="svd", energy=0.9))
>>> s = edgeslim.share.separable(model, SeparableConfig(fit="activations"), data=train)

Deep Compression (Han et al. 2016) is ``magnitude_prune -> fit -> cluster -> fit -> save_compressed``;
``magnitude_prune`` is the minimal pruning it needs (the full pruning technique is a separate package).
Every verb returns a new model with a ``.report`` (:class:`ShareReport`) and never modifies its input.
"""

from edgeslim.share._cluster import (
    CLUSTER_INITS,
    ClusterConfig,
    ClusteredLayer,
    ClusterInit,
    cluster,
    kmeans_1d,
    strip_clustering,
)
from edgeslim.share._common import ShareReport
from edgeslim.share._factorize import (
    FactorizeConfig,
    FactorizeMethod,
    SeparableConfig,
    SeparableFit,
    factorize,
    separable,
)
from edgeslim.share._sparsity import PruneMask, magnitude_prune
from edgeslim.share._storage import CODECS, StorageReport, dense_size, load_compressed, read_compressed, save_compressed
from edgeslim.share._tie import TieConfig, TieInit, find_groups, tie_layers

__all__ = [
    "CLUSTER_INITS",
    "CODECS",
    "ClusterConfig",
    "ClusterInit",
    "ClusteredLayer",
    "FactorizeConfig",
    "FactorizeMethod",
    "PruneMask",
    "SeparableConfig",
    "SeparableFit",
    "ShareReport",
    "StorageReport",
    "TieConfig",
    "TieInit",
    "cluster",
    "dense_size",
    "factorize",
    "find_groups",
    "kmeans_1d",
    "load_compressed",
    "magnitude_prune",
    "read_compressed",
    "save_compressed",
    "separable",
    "strip_clustering",
    "tie_layers",
]
