"""Exact phase-2 attention: new tokens against every rank's cached block, merged by LSE.

Each rank attends the new queries to its own cache and produces ``(out_r, lse_r)``; the
ranks all-gather these and merge exactly::

    lse = log Σ_r exp(lse_r),   out = Σ_r exp(lse_r − lse) · out_r      (float32)

Every cached token precedes the new ones, so non-owner ranks attend **without** a causal
mask.  The owner's cache ends with the new tokens themselves, which it attends causally
(bottom-right aligned).  A rank with an empty cache contributes ``lse = -inf``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..comm import all_gather_async, group_size
from ..ops.attention import attention_with_lse
from ..ops.decode_kernel import kernel_available, split_kv_attention
from ..ops.merge import merge_attention
from ..ops.validation import check_attention_inputs

# Query rows x query heads per KV head up to which the split-KV kernel serves a step; a
# longer query (the first phase-2 step with a long question) takes the prefill kernels.
SPLIT_KV_MAX_ROWS = 64

Tensor = torch.Tensor


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    *,
    owner: bool,
    group,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """q [batch, m, heads, d]; the cache [batch, L, kv_heads, d] (the owner's includes the m
    new tokens at its end).  Returns the merged [batch, m, heads, d], equal on every rank.

    ``lengths``: int [batch] on the device, the valid rows of each sequence's cache (the
    rest of the storage is ignored): a static cache read without a host sync, by the
    split-KV kernel (its float32 reference where Triton is missing)."""
    check_attention_inputs(q, k_cache, v_cache, where="decode_attention")  # metadata only
    rows = q.shape[1] * (q.shape[2] // k_cache.shape[2])
    if lengths is not None and lengths.device.type == "cpu" and lengths.numel() == 1:
        # one sequence, lengths in host memory: reading them costs nothing, and the valid
        # rows then take the attention kernels of any other step
        n = int(lengths[0])
        k_cache, v_cache, lengths = k_cache[:, :n], v_cache[:, :n], None
    if lengths is not None:
        out, lse = split_kv_attention(q, k_cache, v_cache, lengths=lengths, causal=owner,
                                      softmax_scale=softmax_scale)
    elif backend == "auto" and q.is_cuda and kernel_available(q) and rows <= SPLIT_KV_MAX_ROWS:
        # flash-decoding: the cache is split across thread blocks, GQA read natively
        out, lse = split_kv_attention(q, k_cache, v_cache, causal=owner, softmax_scale=softmax_scale)
    else:
        out, lse = attention_with_lse(
            q, k_cache, v_cache, causal=owner, softmax_scale=softmax_scale, backend=backend
        )
    if group_size(group) == 1:
        return out
    # one collective: the LSE rides along as an extra channel of the output
    packed = torch.cat([out.float(), lse.transpose(1, 2).unsqueeze(-1)], dim=-1)
    gathered = all_gather_async(packed, group).wait()  # [world, batch, m, heads, d + 1]
    outs = list(gathered[..., :-1].unbind(0))
    lses = list(gathered[..., -1].transpose(2, 3).unbind(0))  # each [batch, heads, m]
    merged, _ = merge_attention(outs, lses)
    return merged.to(q.dtype)
