"""Retaining-head training targets, computed on the fly from the frozen model.

For a prompt followed by its answer (teacher-forced, causal), the label of layer i, KV head
j and prompt token k is

    label[i, k, j] = max over answer positions p and query heads h of group j of
                     (q_p,h · k_k,j) / sqrt(d)

with post-RoPE q and k, i.e. the largest pre-softmax logit any answer token gives the
token in that layer and KV group.  Every answer position follows every prompt token, so
the causal mask hides none of these pairs.

:func:`sample_features` runs the model once in ``exact`` mode and, from a hook on each
:class:`~megatron_apb.megatron.APBCoreAttention`, keeps what the retaining head consumes
(the **pre-RoPE** q, k, v of the prompt tokens) and the labels, computed in chunks of
prompt tokens.  Under TP each rank gets its own heads; under CP (contiguous blocks of
``prompt ‖ answer``) each rank gets its own block's prompt tokens, and the answer's
post-RoPE queries (a few rows) are summed over the CP group so every rank sees them.

:func:`reference_labels` recomputes the same quantities densely in float64 with plain
torch from a full (TP = 1) Megatron state dict, sharing no code with the fast path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..comm import collective_device, group_rank, group_size
from ..config import APBConfig, CPLayout
from ..forward import ForwardContext
from ..megatron.adapter import MegatronAdapter
from ..megatron.rope import apply_rope, rope_positions, table_rows
from ..megatron.setup import apb_modules

Tensor = torch.Tensor


@dataclass
class SampleFeatures:
    """One prompt as seen by this rank's retaining heads.

    Attributes:
        q, k, v: per layer, pre-RoPE ``[1, n, heads, d]`` / ``[1, n, kv_heads, d]`` of this
            rank's ``n`` prompt tokens and this TP rank's heads, in the model's dtype.
        labels: float32 ``[layers, n, kv_heads]`` (the max answer logit, see the module doc).
        prompt_len: prompt tokens of the whole sample.
        start: index in the prompt of this rank's first token.
        block_len: tokens per CP block (``ceil((prompt + answer) / cp)``).
    """

    q: List[Tensor]
    k: List[Tensor]
    v: List[Tensor]
    labels: Tensor
    prompt_len: int
    start: int
    block_len: int

    @property
    def num_tokens(self) -> int:
        return self.labels.shape[1]


def answer_max_logits(q_answer: Tensor, k_prompt: Tensor, *, softmax_scale: float, chunk_size: int = 1024) -> Tensor:
    """Max pre-softmax logit per prompt token and KV head, in chunks of prompt tokens.

    Args:
        q_answer: ``[A, heads, d]`` post-RoPE queries of the answer tokens.
        k_prompt: ``[n, kv_heads, d]`` post-RoPE keys of the prompt tokens.
    Returns:
        float32 ``[n, kv_heads]``: ``softmax_scale · max_{p, h in group j} q[p, h] · k[k, j]``.
        Memory per chunk: ``kv_heads · A · heads/kv_heads · chunk_size`` floats.
    """
    A, heads, d = q_answer.shape
    n, kv_heads, _ = k_prompt.shape
    if A == 0:
        raise ValueError("labels need at least one answer token")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    group = heads // kv_heads
    # [A, kv, group, d] -> [kv, A*group, d]: all query rows of KV group j
    qg = q_answer.float().reshape(A, kv_heads, group, d).permute(1, 0, 2, 3).reshape(kv_heads, A * group, d)
    out = torch.empty(n, kv_heads, dtype=torch.float32, device=k_prompt.device)
    for s in range(0, n, chunk_size):
        kc = k_prompt[s : s + chunk_size].float().permute(1, 2, 0)  # [kv, d, c]
        out[s : s + chunk_size] = torch.bmm(qg, kc).amax(dim=1).transpose(0, 1) * softmax_scale
    return out


class _Stop(Exception):
    """Raised after the last layer's capture: the rest of the forward is not needed."""


def _answer_rows(q: Tensor, offset: int, prompt_len: int, answer_len: int, group) -> Tensor:
    """The answer's post-RoPE queries ``[A, heads, d]`` (float32) on every CP rank.

    ``q`` [s, heads, d] holds global rows ``offset .. offset+s-1``; each answer row lives on
    one rank, so a sum over the group of zero-filled buffers is an exact gather.
    """
    buf = torch.zeros(answer_len, *q.shape[1:], dtype=torch.float32, device=q.device)
    lo, hi = max(prompt_len, offset), min(prompt_len + answer_len, offset + q.shape[0])
    if hi > lo:
        buf[lo - prompt_len : hi - prompt_len] = q[lo - offset : hi - offset].float()
    if group_size(group) > 1:
        wire = buf.to(collective_device(group, buf.device))
        torch.distributed.all_reduce(wire, group=group)
        buf = wire.to(buf.device)
    return buf


@contextlib.contextmanager
def _pre_hooks(modules, hook):
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sample_features(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], *, chunk_size: int = 1024, pad_id: int = 0) -> SampleFeatures:
    """Run the frozen ``model`` on ``prompt ‖ answer`` (exact attention) and return this
    rank's :class:`SampleFeatures`.

    ``model`` is a GPTModel built with the APB layer spec (any APB config: the forward runs
    in ``exact`` mode).  Every rank of the model's CP group passes the whole sample; the
    sequence is padded at its end to ``cp`` equal contiguous blocks and each rank feeds its
    own (padding after the answer changes nothing earlier under the causal mask).  The
    forward stops after the last layer's attention inputs are captured.
    """
    modules = apb_modules(model)
    if not modules:
        raise ValueError("the model has no APB attention modules; build it with the APB layer spec")
    prompt_len, answer_len = len(prompt_ids), len(answer_ids)
    if prompt_len < 1 or answer_len < 1:
        raise ValueError(f"a sample needs prompt and answer tokens, got {prompt_len} and {answer_len}")
    cp_group = modules[0].cp_group
    cp, rank = group_size(cp_group), group_rank(cp_group)
    total = prompt_len + answer_len
    block = -(-total // cp)
    tokens = list(prompt_ids) + list(answer_ids) + [pad_id] * (block * cp - total)
    offset = rank * block
    n_local = max(0, min(prompt_len, offset + block) - offset)
    device = next(model.parameters()).device
    local = torch.tensor(tokens[offset : offset + block], dtype=torch.long, device=device)[None]
    layout = CPLayout(mode="exact", block_len=block)
    index = {id(m): i for i, m in enumerate(modules)}
    qs, ks, vs = [None] * len(modules), [None] * len(modules), [None] * len(modules)
    labels = [None] * len(modules)

    def capture(module, args, kwargs):
        i = index[id(module)]
        table = kwargs.get("rotary_pos_emb")
        q_pre, k_pre, v = (t.transpose(0, 1) for t in args[:3])  # Megatron [s, b, h, d] -> [b, s, h, d]
        if q_pre.shape[0] != 1 or q_pre.shape[1] != block:
            raise RuntimeError(f"expected 1 x {block} rows in layer {i}, got {tuple(q_pre.shape[:2])}")
        q, k = q_pre, k_pre
        if table is not None:  # the same rotation the attention applies
            freqs = table_rows(table, rope_positions(layout, rank, device=q.device), cp, block)
            q = apply_rope(q_pre, freqs, module.rotary_interleaved)
            k = apply_rope(k_pre, freqs, module.rotary_interleaved)
        q_answer = _answer_rows(q[0], offset, prompt_len, answer_len, cp_group)  # [A, heads, d]
        labels[i] = answer_max_logits(q_answer, k[0, :n_local], softmax_scale=module.softmax_scale, chunk_size=chunk_size)
        qs[i], ks[i], vs[i] = (t[:, :n_local].contiguous() for t in (q_pre, k_pre, v))
        if i == len(modules) - 1:
            raise _Stop

    exact = APBConfig(mode="exact", backend=modules[0].apb_config.backend)
    adapter = MegatronAdapter(model)
    context = ForwardContext.prefill(config=exact, rotary_table=adapter.rotary_table(block * cp))
    with torch.no_grad(), _pre_hooks(modules, capture):
        try:
            adapter.run_layers(adapter.embed(local), context)
        except _Stop:
            pass
    if any(x is None for x in labels):
        raise RuntimeError("not every APB attention layer ran; is the model a GPTModel built with the APB spec?")
    return SampleFeatures(
        q=qs, k=ks, v=vs, labels=torch.stack(labels), prompt_len=prompt_len,
        start=min(offset, prompt_len), block_len=block,
    )


# ------------------------------------------------------------------------------ reference
def reference_labels(state, config, prompt_ids, answer_ids, *, inv_freq):
    """Labels and retaining-head inputs by a dense float64 forward in plain torch.

    Args:
        state: full (TP = 1) Megatron state dict of a Llama-style GPTModel (local layer spec:
            ``linear_qkv`` rows ordered per query group as [q heads of the group, k, v]).
        config: its ``TransformerConfig`` (layers, heads, groups, head dim, RMSNorm eps).
        inv_freq: RoPE inverse frequencies ``[d/2]`` (rotate-half convention, no position
            interpolation).
    Returns:
        ``(labels, q, k, v)``: float64 labels ``[layers, prompt, kv_heads]`` and per layer
        the pre-RoPE ``q [prompt, heads, d]``, ``k``/``v [prompt, kv_heads, d]``.
    """
    w = {k: t.double() for k, t in state.items() if isinstance(t, Tensor) and t.is_floating_point()}
    heads, kv_heads, d = config.num_attention_heads, config.num_query_groups, config.kv_channels
    group, eps = heads // kv_heads, config.layernorm_epsilon
    tokens = torch.as_tensor(list(prompt_ids) + list(answer_ids))
    P, T = len(prompt_ids), tokens.numel()
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq.double()[None]  # [T, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rope(x):  # x [T, h, d]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["embedding.word_embeddings.weight"][tokens]
    labels, q_out, k_out, v_out = [], [], [], []
    for i in range(config.num_layers):
        p = f"decoder.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "self_attention.linear_qkv.weight"].T
        if p + "self_attention.linear_qkv.bias" in w:
            qkv = qkv + w[p + "self_attention.linear_qkv.bias"]
        qkv = qkv.view(T, kv_heads, group + 2, d)
        q, k, v = qkv[:, :, :group].reshape(T, heads, d), qkv[:, :, group], qkv[:, :, group + 1]
        q_out.append(q[:P]), k_out.append(k[:P]), v_out.append(v[:P])
        qr, kr = rope(q), rope(k)
        layer_labels = torch.empty(P, kv_heads, dtype=torch.float64)
        for j in range(kv_heads):
            logits = torch.einsum("phd,kd->phk", qr[P:, j * group : (j + 1) * group], kr[:P, j]) / math.sqrt(d)
            layer_labels[:, j] = logits.amax(dim=(0, 1))
        labels.append(layer_labels)
        kr_full, v_full = kr.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("shd,thd->hst", qr, kr_full) / math.sqrt(d)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        attn = torch.einsum("hst,thd->shd", probs, v_full).reshape(T, heads * d)
        x = x + attn @ w[p + "self_attention.linear_proj.weight"].T
        h = rms(x, w[p + "pre_mlp_layernorm.weight"])
        gate, up = (h @ w[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w[p + "mlp.linear_fc2.weight"].T
    return torch.stack(labels), q_out, k_out, v_out
