"""An independent, single-process simulation of APB on a Llama-style model, in plain torch.

Written from the algorithm's description, sharing no code with the package: each host's
keys ``[anchor; passing; local]`` and its mask are built explicitly, per KV head, and
attention is a dense float64 softmax.  Tests run the distributed Megatron model and this
simulation on the same weights and compare logits.

Weights are a Megatron GPTModel state dict at TP = 1 (local layer spec): fused
``linear_qkv`` rows are ordered per query group as [q heads of the group, k, v].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float = 1e-5
    rotary_base: float = 10000.0


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, base):
    """x [s, heads, d] rotated at integer positions (rotate-half convention)."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = positions.double()[:, None] * inv[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    x1, x2 = x.double().chunk(2, -1)
    return (x.double() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def _qkv(w, prefix, x, shape):
    s = x.shape[0]
    per_group = shape.num_heads // shape.num_kv_heads
    qkv = (x @ w[prefix + "linear_qkv.weight"].T).view(s, shape.num_kv_heads, per_group + 2, shape.head_dim)
    q = qkv[:, :, :per_group].reshape(s, shape.num_heads, shape.head_dim)
    return q, qkv[:, :, per_group], qkv[:, :, per_group + 1]


def _mlp(w, prefix, x):
    gate, up = (x @ w[prefix + "mlp.linear_fc1.weight"].T).chunk(2, -1)
    return (F.silu(gate) * up) @ w[prefix + "mlp.linear_fc2.weight"].T


def _attend(q, keys, values, mask, group):
    """Dense float64 attention; q [s, h, d], keys/values per KV head lists, mask per KV head."""
    s, h, d = q.shape
    out = torch.zeros(s, h, d, dtype=torch.float64)
    for head in range(h):
        g = head // group
        logits = (q[:, head].double() @ keys[g].double().T) / math.sqrt(d)
        logits = logits.masked_fill(~mask[g], float("-inf"))
        out[:, head] = torch.softmax(logits, -1) @ values[g].double()
    return out.to(q.dtype)


def full_attention_logits(w, shape: ModelShape, tokens):
    """Plain causal Llama forward on one sequence: logits [s, vocab]."""
    return simulate_apb(w, shape, [tokens], anchor_len=0, block_len=len(tokens), passing_len=0)[0]


def simulate_apb(
    w,
    shape: ModelShape,
    host_tokens,
    *,
    anchor_len,
    block_len,
    passing_len,
    compressor="retaining_head",
    query_start=0,
    query_len=0,
    first_rank_anchor=False,
    smoothing=5,
    block_lens=None,
):
    """Logits of every host under APB.  ``host_tokens[h]`` is host h's [anchor; block] ids;
    blocks are ``block_len`` tokens each, or ``block_lens[h]`` for host h."""
    H = len(host_tokens)
    group = shape.num_heads // shape.num_kv_heads
    anchor_of = [anchor_len if (h > 0 or first_rank_anchor) else 0 for h in range(H)]
    lens = list(block_lens) if block_lens is not None else [block_len] * H
    starts = [sum(lens[:h]) for h in range(H)]
    hidden = [w["embedding.word_embeddings.weight"][t] for t in host_tokens]
    positions = [
        torch.cat([torch.arange(anchor_of[h]), starts[h] + torch.arange(lens[h])])
        for h in range(H)
    ]
    for layer in range(shape.num_layers):
        p = f"decoder.layers.{layer}.self_attention."
        lp = f"decoder.layers.{layer}."
        qs, ks, vs, qr, kr = [], [], [], [], []
        for h in range(H):
            x = _rms(hidden[h], w[lp + "input_layernorm.weight"], shape.eps)
            q, k, v = _qkv(w, p, x, shape)
            qs.append(q), ks.append(k), vs.append(v)
            qr.append(_rope(q, positions[h], shape.rotary_base))
            kr.append(_rope(k, positions[h], shape.rotary_base))
        # compressed blocks C_h, per KV head: (keys [lp, d], values [lp, d])
        passed = []
        for h in range(H - 1 if passing_len else 0):
            la, block_len = anchor_of[h], lens[h]
            if compressor == "retaining_head":
                feats = torch.cat(
                    [qs[h][la:].flatten(1), ks[h][la:].flatten(1), vs[h][la:].flatten(1)], -1
                )
                hid = feats @ w[p + "core_attention.retaining_head.fc1.weight"].T
                scores = F.silu(hid) @ w[p + "core_attention.retaining_head.fc2.weight"].T
            else:  # query attention: softmax over local keys from the query rows
                if query_len:
                    rows = qr[h][query_start : query_start + query_len]
                elif la:
                    rows = qr[h][:la]
                else:
                    rows = qr[h][-min(16, block_len):]
                scores = torch.zeros(block_len, shape.num_kv_heads, dtype=torch.float64)
                for head in range(shape.num_heads):
                    g = head // group
                    logit = rows[:, head].double() @ kr[h][la:, g].double().T / math.sqrt(shape.head_dim)
                    scores[:, g] += torch.softmax(logit, -1).sum(0)
            scores = scores.double()
            smoothed = torch.stack(
                [
                    scores[max(0, j - smoothing // 2) : j + smoothing // 2 + 1].max(0).values
                    for j in range(block_len)
                ]
            )
            blocks = []
            for g in range(shape.num_kv_heads):
                # highest scores first, ties to the earlier token
                ranked = sorted(range(block_len), key=lambda j: (-float(smoothed[j, g]), j))
                idx = torch.tensor(sorted(ranked[: min(passing_len, block_len)]))
                blocks.append((kr[h][la:][idx, g], vs[h][la:][idx, g]))
            passed.append(blocks)
        new_hidden = []
        for h in range(H):
            block_len = lens[h]
            la, s = anchor_of[h], anchor_of[h] + block_len
            keys, values, masks = [], [], []
            for g in range(shape.num_kv_heads):
                pk = [passed[src][g][0] for src in range(h)] if passing_len else []
                pv = [passed[src][g][1] for src in range(h)] if passing_len else []
                n_pass = sum(t.shape[0] for t in pk)
                keys.append(torch.cat([kr[h][:la, g], *pk, kr[h][la:, g]]))
                values.append(torch.cat([vs[h][:la, g], *pv, vs[h][la:, g]]))
                mask = torch.zeros(s, la + n_pass + block_len, dtype=torch.bool)
                for i in range(s):
                    if i < la:  # anchor row: causal within the anchor
                        mask[i, : i + 1] = True
                    else:  # local row: anchor (not on host 0), passing, own block causally
                        if h > 0:
                            mask[i, :la] = True
                        mask[i, la : la + n_pass] = True
                        mask[i, la + n_pass : la + n_pass + (i - la) + 1] = True
                masks.append(mask)
            att = _attend(qr[h], keys, values, masks, group)
            x = hidden[h] + att.flatten(1) @ w[p + "linear_proj.weight"].T
            y = _rms(x, w[lp + "pre_mlp_layernorm.weight"], shape.eps)
            new_hidden.append(x + _mlp(w, lp, y))
        hidden = new_hidden
    out_w = w.get("output_layer.weight", w["embedding.word_embeddings.weight"])
    return [_rms(x, w["decoder.final_layernorm.weight"], shape.eps) @ out_w.T for x in hidden]
