"""Fine-tuning retaining heads (Locret) on a frozen Megatron GPTModel with the APB spec.

* :mod:`.labels`: the targets (max answer logit per prompt token, layer and KV head) and
  the heads' pre-RoPE inputs, captured from one exact forward; a float64 reference.
* :mod:`.objective`: loss (SmoothL1 + neighbour smoothness) and top-10% overlap.
* :mod:`.config`: :class:`TrainConfig`; :mod:`.trainer`: :class:`RetainingHeadTrainer` (TP and CP aware).
* :mod:`.checkpoint`: heads beside the model, full-tensor checkpoints, resume.
* :mod:`.data`: JSONL or built-in prompt/answer records to token ids.

Names are imported lazily, so reading data needs no Megatron import.
"""

from .._lazy import lazy_getattr

_EXPORTS = {
    "TrainConfig": ".config",
    "RetainingHeadTrainer": ".trainer",
    "sample_features": ".labels",
    "reference_labels": ".labels",
    "SampleFeatures": ".labels",
    "build_retaining_heads": ".checkpoint",
    "gather_retaining_heads": ".checkpoint",
    "load_retaining_heads": ".checkpoint",
    "read_jsonl": ".data",
    "tokenize_records": ".data",
    "builtin_records": ".data",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
