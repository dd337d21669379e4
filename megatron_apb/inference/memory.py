"""The GPU memory a one-rank prefill and its decoding need, estimated before any work.

:func:`memory_plan` adds up, for a model shape, a prompt length, a dtype, a KV budget and a
prefill chunk:

* **weights**: every layer's attention and gated MLP, the norms, the embedding and the
  output layer (untied);
* **kv_cache**: the cache after the prefill, every layer (the kept tokens, or all of them
  without compression, plus the room for the query and the answer);
* **kv_layer_full**: one layer's K and V before compression (the prefill holds them while
  SnapKV scores them);
* **activations**: one layer's peak during the prefill: the input rows (and their norm
  when unchunked), q/k/v before and after RoPE, the attention output and its LSE, the
  projected output, a block of the row-blocked attention past 2^31 query elements,
  plus the temporaries of one chunk of the QKV projection and of the MLP
  (``prefill_chunk`` rows; the whole sequence when it is 0);
* **scoring**: SnapKV's scores of one chunk of keys and of the whole block;
* a margin for the allocator, workspaces and the CUDA context.

:func:`check_memory_plan` refuses a plan that does not fit, naming the setting to
change.  The figures are estimates of the tensors the code allocates (see
:class:`~megatron_apb.megatron.layer.APBTransformerLayer` and
:mod:`megatron_apb.parallel.snapkv`), not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..errors import APBConfigError

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """A decoder's sizes: layers, hidden, query and KV heads, head size, MLP width, vocabulary."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: Optional[int] = None

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def weights(self) -> int:
        """Parameters: attention (q, k, v, output), gated MLP, two norms per layer; the
        embedding, the output layer and the final norm."""
        attention = self.hidden * (self.heads + 2 * self.kv_heads) * self.d + self.heads * self.d * self.hidden
        per_layer = attention + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


def memory_plan(shape: ModelShape, seq_len: int, *, dtype_bytes: int = 2, kv_budget: Optional[int] = None,
                prefill_chunk: int = 32768, reserve: int = 256, window: int = 32,
                score_chunk: int = 16384, margin: float = 0.08) -> Dict[str, int]:
    """Bytes per part (and ``total``) of a one-rank prefill of ``seq_len`` tokens.

    ``kv_budget``: tokens the cache keeps (None: all); ``prefill_chunk``: rows per chunk of
    the projections and MLP (0: unchunked); ``reserve``: the query and answer tokens the
    cache makes room for; ``window``: SnapKV's observation window; ``margin``: the
    fraction added for the allocator and workspaces (plus 1 GiB for the CUDA context)."""
    if seq_len < 1:
        raise APBConfigError(f"the prompt must have >= 1 token, got {seq_len}")
    s, b, d = seq_len, dtype_bytes, shape.d
    q_cols, kv_cols = shape.heads * d, shape.kv_heads * d
    kept = seq_len if kv_budget is None else min(kv_budget, seq_len)
    chunk = min(prefill_chunk or s, s)
    parts = {
        "weights": shape.weights() * b,
        "kv_cache": shape.layers * 2 * kv_cols * (kept + reserve) * b,
        "kv_layer_full": 2 * kv_cols * s * b if kv_budget is not None else 0,
        # the layer's input rows and its projected output (a chunked prefill norms per chunk;
        # unchunked, the norm's output is one more), q/k/v pre-RoPE, q/k post-RoPE, the
        # attention output, float32 LSE
        "activations": s * b * ((2 if prefill_chunk else 3) * shape.hidden + 3 * (q_cols + kv_cols))
        + s * shape.heads * 4
        # one chunk: the mixed QKV projection, the MLP's two halves, their product, its output
        + chunk * b * (q_cols + 2 * kv_cols + 3 * shape.ffn + shape.hidden)
        # past 2^31 query elements attention runs in blocks of rows (ops/blocked.py): one
        # block's two float32 parts and their merge
        + (3 * 4 * q_cols * min(s, 2**28 // q_cols) if s * q_cols > 2**31 else 0),
        "scoring": (3 * shape.heads * window * min(score_chunk, s) + 2 * shape.kv_heads * s) * 4
        if kv_budget is not None else 0,
    }
    subtotal = sum(parts.values())
    parts["margin"] = int(margin * subtotal) + GIB
    parts["total"] = subtotal + parts["margin"]
    return parts


def check_memory_plan(plan: Dict[str, int], available: int, *, flags: Optional[Dict[str, str]] = None) -> None:
    """Raise :class:`APBConfigError` when ``plan`` (:func:`memory_plan`) needs more than
    ``available`` bytes, naming the largest part and the setting that shrinks it.
    ``flags``: the spelling of the settings in the caller's front-end
    (``kv_budget``, ``prefill_chunk``, ``length``)."""
    if plan["total"] <= available:
        return
    names = {"kv_budget": "--kv-budget", "prefill_chunk": "--prefill-chunk", "length": "a shorter prompt"}
    names.update(flags or {})
    fixes = {
        "kv_cache": f"keep fewer tokens: lower {names['kv_budget']} (or set one: KV compression is off)",
        "activations": f"lower {names['prefill_chunk']} (or, past that, use {names['length']} or more GPUs)",
        "weights": "use a GPU with more memory, or tensor parallelism",
    }
    worst = max(fixes, key=lambda k: plan[k])
    detail = ", ".join(f"{k} {plan[k] / GIB:.1f}" for k in plan if k != "total")
    raise APBConfigError(
        f"the prefill needs about {plan['total'] / GIB:.1f} GiB but {available / GIB:.1f} GiB are free "
        f"({detail} GiB): {fixes[worst]}", field="kv_budget" if worst == "kv_cache" else "prefill_chunk")
