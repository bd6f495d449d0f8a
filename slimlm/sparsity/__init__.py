"""Pruning: unstructured / N:M (magnitude, Wanda, SparseGPT), sparse storage, structured pruning.

Importing this package registers the ``sparse`` linear kind so saved pruned models load.
See docs/pruning.md.
"""

from slimlm.sparsity.config import PruneConfig
from slimlm.sparsity.prune import prune_
from slimlm.sparsity.storage import SparseLinear

__all__ = ["PruneConfig", "SparseLinear", "prune_"]
