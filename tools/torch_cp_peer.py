"""PyTorch's own context parallelism as a benchmark peer.

``torch.distributed.tensor.experimental.context_parallel`` shards the sequence over a device
mesh (head-tail load balancing) and replaces ``F.scaled_dot_product_attention`` by exact
ring attention; it is what a PyTorch user can run over several GPUs with no extra package.
It only patches SDPA, so the model here is a minimal Llama-shaped one in plain PyTorch
(RMSNorm, RoPE, GQA expanded for SDPA, SwiGLU) with the same shape table and random bf16
weights as ``bench_prefill.py``; every rank holds all weights (no TP).

``check_peer`` compares the context-parallel forward with the same model on one GPU, so a
timing is only reported for a peer that computes the right thing.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class _Layer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, ffn, eps=1e-5):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, hidden // heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden, eps=eps), nn.RMSNorm(hidden, eps=eps)
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.d, bias=False)
        self.o = nn.Linear(heads * self.d, hidden, bias=False)
        self.fc1 = nn.Linear(hidden, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x, cos, sin):  # x [b, s, hidden]; cos/sin [s, d]
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, -1, self.d).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        group = self.heads // self.kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]: the sequence is dim 2
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


def _rope(x, cos, sin):  # x [b, s, h, d]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[None, :, None] + torch.cat([-x2, x1], dim=-1) * sin[None, :, None]


class MiniLlama(nn.Module):
    """Embedding and decoder layers of a Llama-shaped model (no logits: prefill only)."""

    def __init__(self, num_layers, hidden_size, num_attention_heads, num_query_groups,
                 ffn_hidden_size, vocab, rotary_base):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden_size)
        self.layers = nn.ModuleList(
            _Layer(hidden_size, num_attention_heads, num_query_groups, ffn_hidden_size)
            for _ in range(num_layers))
        self.norm = nn.RMSNorm(hidden_size, eps=1e-5)
        d = hidden_size // num_attention_heads
        self.register_buffer("inv_freq", 1.0 / rotary_base ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def forward(self, ids, positions):  # ids, positions [b, s]; positions may be load-balanced
        angles = positions[0].float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        x = self.embed(ids)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


def build_peer(shape: dict, layers=None, seed=1234) -> MiniLlama:
    s = dict(shape)
    if layers:
        s["num_layers"] = layers
    with torch.device("cuda"):
        model = MiniLlama(**s).to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]


def _cp_forward(model, mesh, ids, rotate, backend):
    """One context-parallel forward; returns this rank's (load-balanced) output shard."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import sdpa_kernel

    set_rotate_method(rotate)
    ids = ids.clone()
    positions = torch.arange(ids.shape[1], device=ids.device)[None].clone()
    with sdpa_kernel([_sdpa_backend(backend)]), context_parallel(
        mesh, buffers=[ids, positions], buffer_seq_dims=[1, 1], no_restore_buffers={ids, positions}
    ):
        return model(ids, positions)


@torch.no_grad()
def check_peer(model, mesh, length, rotate, backend) -> float:
    """Max |CP forward - one-GPU forward| / max |one-GPU forward| at ``length`` tokens."""
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    from torch.nn.attention import sdpa_kernel

    ids = torch.randint(0, 32000, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    local = _cp_forward(model, mesh, ids, rotate, backend)
    (full_cp,) = context_parallel_unshard(mesh, [local], [1])
    with sdpa_kernel([_sdpa_backend(backend)]):
        ref = model(ids, torch.arange(length, device="cuda")[None])
    return ((full_cp.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@torch.no_grad()
def time_peer(model, mesh, length, iters, warmup, rotate="allgather", backend="cudnn"):
    """Median seconds of a context-parallel prefill of ``length`` tokens (all ranks synced)."""
    import torch.distributed as dist

    ids = torch.randint(0, 100000, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(length))
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _cp_forward(model, mesh, ids, rotate, backend)
        torch.cuda.synchronize()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times
