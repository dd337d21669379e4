"""Dynamic sparse attention (MInference-style): patterns, index estimation, references and
the Triton kernel.  Pure attention math: no process groups.

* :mod:`.patterns`: :class:`AShape`, :class:`VerticalSlash`, :class:`BlockSparse` and the
  per-layer, per-head :class:`SparsePlan` (JSON);
* :mod:`.index`: the key blocks and columns each query block reads, estimated per prompt;
* :mod:`.reference`: dense float32 attention under an index's mask (the ground truth);
* :mod:`.kernel`: the Triton kernel returning ``(out, lse)``;
* :mod:`.backend`: :class:`SparseAttention`, the ``minference`` backend of
  ``APBConfig.sparse``.
"""

from .backend import SparseAttention, summarize_stats
from .index import SparseIndex, block_sparse_density, build_index, density, index_mask
from .kernel import kernel_available, sparse_attention
from .patterns import AShape, BlockSparse, SparsePlan, VerticalSlash, budget_pattern, load_plan, plan_from_dict
from .reference import sparse_reference_attention

__all__ = [
    "AShape", "BlockSparse", "SparseAttention", "SparseIndex", "SparsePlan", "VerticalSlash",
    "block_sparse_density", "budget_pattern", "build_index", "density", "index_mask",
    "kernel_available", "load_plan", "plan_from_dict", "sparse_attention", "sparse_reference_attention",
    "summarize_stats",
]
