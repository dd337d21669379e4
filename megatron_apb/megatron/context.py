"""Per-forward state of the APB attention modules: the prompt layout.

A layer spec is fixed when the model is built; the layout (block length, anchor, passing
length, where the query sits) depends on each prompt.  :func:`apb_layout` sets it on every
APB attention module of a model for the duration of a forward::

    with apb_layout(model, config.layout(block_len, cp_size=cp, query_len=query_len)):
        logits = model(input_ids, position_ids, attention_mask=None)
"""

from __future__ import annotations

import contextlib


def apb_modules(model):
    """The APB core-attention modules of ``model``."""
    from .core_attention import APBCoreAttention

    return [m for m in model.modules() if isinstance(m, APBCoreAttention)]


def apb_layout(model, layout):
    """Use ``layout`` in every APB attention module of ``model`` inside the block."""
    return apb_runtime(model, layout=layout)


@contextlib.contextmanager
def apb_runtime(model, *, layout=None, kv_cache=None, decode_positions=None, config=None):
    """Set the per-forward state of every APB attention module of ``model`` in the block.

    * prefill: ``layout`` (and ``kv_cache`` to keep each rank's block K/V);
    * phase 2: ``kv_cache`` and ``decode_positions`` (the new tokens' positions);
    * ``config``: run another APBConfig than the one the model was built with (e.g. to
      compare modes on one set of weights); the retaining_head compressor needs a model
      built with retaining heads.
    """
    modules = apb_modules(model)
    if not modules:
        raise ValueError(
            "the model has no APB attention modules; build it with "
            "megatron_apb.get_gpt_layer_apb_spec(...)"
        )
    names = ("layout", "kv_cache", "decode_positions", "apb_config")
    if config is not None and config.mode == "apb" and config.compressor == "retaining_head":
        if any(m.retaining_head is None for m in modules):
            raise ValueError(
                "compressor='retaining_head' needs a model built with retaining heads: build "
                "it with that compressor (and load trained heads)"
            )
    previous = [[getattr(m, n) for n in names] for m in modules]
    for m in modules:
        values = (layout, kv_cache, decode_positions, config or m.apb_config)
        for n, v in zip(names, values):
            setattr(m, n, v)
        if m.forward_guard is not None:
            m.forward_guard.reset()
    try:
        yield
    finally:
        for m, old in zip(modules, previous):
            for n, v in zip(names, old):
                setattr(m, n, v)
            if m.forward_guard is not None:
                m.forward_guard.reset()
