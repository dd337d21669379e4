"""GPU checks: each CUDA attention backend against the float64 reference, and the
distributed model over NCCL.  Skipped on machines without CUDA (CI); run on the GPU machine.

Tolerance, flash-attention's rule: in bf16, a backend's max error against the float64
reference is at most 2x the max error of plain PyTorch attention computed in bf16.
"""

import math

import pytest
import torch

from megatron_apb import apb_attention, attention_with_lse
from megatron_apb.ops.reference import apb_reference_attention, causal_mask, reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = ["cudnn", "flash", "efficient", "sdpa", "flex", "math", "auto"]
SHAPES = [  # (batch, q_len, k_len, heads, kv_heads, head_dim)
    (1, 1, 5000, 32, 8, 128),  # decoding ("auto": grouped small-query matmuls)
    (1, 40, 5040, 32, 8, 128),  # the query step on the owner
    (1, 1000, 1000, 8, 2, 128),
    (2, 333, 777, 4, 4, 64),
    (1, 512, 2048, 32, 8, 128),
]


def _plain_bf16(q, k, v, mask, scale):
    """softmax(q k^T * scale) v entirely in bf16: the rule's yardstick."""
    h = q.shape[2]
    kk = k.repeat_interleave(h // k.shape[2], 2).transpose(1, 2)
    vv = v.repeat_interleave(h // v.shape[2], 2).transpose(1, 2)
    s = (q.transpose(1, 2) @ kk.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_backend_two_x_rule(backend, shape, causal):
    b, sq, sk, h, kvh, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, sq, h, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(b, sk, kvh, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(b, sk, kvh, d, device="cuda", generator=g).bfloat16()
    mask = causal_mask(sq, sk, device="cuda") if causal else None
    ref, ref_lse = reference_attention(q, k, v, mask)
    ref = reference_attention(q.double(), k.double(), v.double(), mask)[0]
    out, lse = attention_with_lse(q, k, v, causal=causal, backend=backend)
    pt = _plain_bf16(q, k, v, mask, 1 / math.sqrt(d))
    err, pt_err = (out.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert err <= 2 * pt_err, (backend, err, pt_err)
    # the LSE is fp32 arithmetic on bf16 inputs: 1e-2 absolute on values of ~log(sk) + 10
    assert (lse - ref_lse).abs().max().item() < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_apb_attention_two_x_rule(backend):
    g = torch.Generator(device="cuda").manual_seed(1)
    b, la, lb, p, h, kvh, d = 1, 257, 1031, 130, 32, 8, 128
    q = torch.randn(b, la + lb, h, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(b, la + lb, kvh, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(b, la + lb, kvh, d, device="cuda", generator=g).bfloat16()
    pk = torch.randn(b, p, kvh, d, device="cuda", generator=g).bfloat16()
    pv = torch.randn(b, p, kvh, d, device="cuda", generator=g).bfloat16()
    ref, _ = apb_reference_attention(q.double(), k.double(), v.double(), anchor_len=la,
                                     passing_k=pk.double(), passing_v=pv.double())
    out = apb_attention(q, k, v, anchor_len=la, passing_k=pk, passing_v=pv, backend=backend)
    from megatron_apb.ops.reference import apb_reference_mask

    keys = torch.cat([k[:, :la], pk, k[:, la:]], 1)
    vals = torch.cat([v[:, :la], pv, v[:, la:]], 1)
    pt = _plain_bf16(q, keys, vals, apb_reference_mask(la, p, lb).cuda(), 1 / math.sqrt(d))
    err, pt_err = (out.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert err <= 2 * pt_err, (backend, err, pt_err)


@pytest.mark.parametrize("rows", [1, 40961])  # a decode step; a last-rank prefill (odd size)
def test_compiled_fused_norm_and_rope_two_x_rule(rows):
    import torch.nn.functional as F

    from megatron_apb.megatron.rope import apply_rope
    from megatron_apb.ops.fused import fused_rms_norm, fused_rope

    g = torch.Generator(device="cuda").manual_seed(rows)
    x = (torch.randn(rows, 1, 4096, device="cuda", generator=g) * 2).bfloat16()
    w = torch.randn(4096, device="cuda", generator=g).bfloat16()
    ref = F.rms_norm(x.double(), (4096,), w.double(), 1e-5)
    err = (fused_rms_norm(x, w, 1e-5).double() - ref).abs().max().item()
    pt_err = (F.rms_norm(x, (4096,), w, 1e-5).double() - ref).abs().max().item()
    assert err <= 2 * pt_err, (err, pt_err)
    q = torch.randn(1, rows, 32, 128, device="cuda", generator=g).bfloat16()
    inv = 1.0 / 500000 ** (torch.arange(0, 128, 2, device="cuda").double() / 128)
    angles = (torch.arange(rows, device="cuda").double() + 70000)[:, None] * inv[None]
    freqs = torch.cat([angles, angles], -1).float()
    ref = apply_rope(q.double(), freqs.double())
    err = (fused_rope(q, freqs).double() - ref).abs().max().item()
    pt_err = (apply_rope(q, freqs).double() - ref).abs().max().item()
    assert err <= 2 * pt_err, (err, pt_err)


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_native_gqa_matches_expanded_heads(backend):
    """Where the kernel reads grouped KV heads itself, it gives the expanded call's result
    on a prefill-sized input (the probe only checks a small one)."""
    from megatron_apb.ops import attention as att

    if not att.native_gqa(backend, "cuda"):
        pytest.skip(f"{backend} on this build expands KV heads (probe said no)")
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, 4096, 32, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, 6144, 8, 128, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, 6144, 8, 128, device="cuda", generator=g).bfloat16()
    for causal in (True, False):
        got, got_lse = att._fused_call(q, k, v, causal, 0.088, backend)
        kk, vv = att._expand_kv(k, 32), att._expand_kv(v, 32)
        want, want_lse = att._fused_call(q, kk, vv, causal, 0.088, backend)
        # the same kernel may order its accumulation differently: about one bf16 rounding
        # step of outputs of magnitude ~1 (7.8e-3), and float32 noise in the LSE
        assert (got.float() - want.float()).abs().max().item() <= 1e-2
        assert (got_lse - want_lse).abs().max().item() <= 1e-3


def test_triton_merge_and_rope_two_x_rule():
    """The Triton kernels on strided views (as the layer hands them over) against float64,
    within 2x the error of the same math in eager PyTorch."""
    from megatron_apb.ops import triton_kernels
    from megatron_apb.ops.fused import _rope_math
    from megatron_apb.ops.merge import _merge_two, concat_merged

    if not triton_kernels.HAVE_TRITON:
        pytest.skip("Triton is not installed")
    g = torch.Generator(device="cuda").manual_seed(3)
    prefix = torch.randn(1, 1000, 32, 128, device="cuda", generator=g).bfloat16()
    own = torch.randn(1, 32, 4001, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
    ctx = torch.randn(1, 4001, 32, 128, device="cuda", generator=g).bfloat16()
    lses = [torch.randn(1, 32, 4001, device="cuda", generator=g) * 3 for _ in range(2)]
    lses[1][:, :, :7] = float("-inf")  # rows the second part does not cover
    lses[0][:, 3, 0] = lses[1][:, 3, 0] = float("-inf")  # a row no part covers: zeros
    parts = (own, lses[0], ctx, lses[1])
    want = torch.cat([prefix.double(), _merge_two(*(t.double() for t in parts))[0]], 1)
    eager = torch.cat([prefix, _merge_two(*parts)[0]], 1)
    got = concat_merged(prefix, [own, ctx], lses)
    err, eager_err = (got.double() - want).abs().max().item(), (eager.double() - want).abs().max().item()
    assert got.shape == want.shape and err <= 2 * eager_err + 1e-6, (err, eager_err)
    assert torch.all(got[:, 1000, 3] == 0)
    # RoPE on a head slice of a fused QKV projection (non-contiguous rows)
    qkv = torch.randn(1, 3001, 48, 128, device="cuda", generator=g).bfloat16()
    q = qkv[:, :, :32]
    angles = torch.randn(3001, 128, device="cuda", generator=g) * 50
    cos, sin = angles.cos(), angles.sin()
    want = _rope_math(q.double(), cos.double(), sin.double())
    err = (triton_kernels.rope_triton(q, cos, sin).double() - want).abs().max().item()
    eager_err = (_rope_math(q, cos, sin).double() - want).abs().max().item()
    assert err <= 2 * eager_err + 1e-6, (err, eager_err)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ GPUs")
def test_distributed_modes_over_nccl():
    from tests.distributed import run_distributed
    from tests.megatron_workers import check_modes
    from tests.test_megatron_cp import APB_CASES, EXACT_CASES, _check

    world = min(4, torch.cuda.device_count())
    cases = EXACT_CASES + APB_CASES
    results = run_distributed(check_modes, world, 1, world, 61, cases, "cuda", backend="nccl")
    _check(results, cases, cp=world)


def test_engine_with_ranks_sharing_gpus_over_gloo():
    """Four ranks on however many GPUs there are, collectives through host memory (the
    accuracy suite's set-up): exact and lossless APB generation equal full recomputation."""
    from tests.distributed import run_distributed
    from tests.engine_workers import generate_vs_recompute
    from tests.test_engine import EXACT, LOSSLESS, _check

    results = run_distributed(generate_vs_recompute, 4, 1, 4, 37, 8, [EXACT, LOSSLESS], "cuda")
    _check(results, 37, 4, 8)


@pytest.mark.parametrize("m, lengths, causal", [(1, None, True), (1, [5000, 1234], True), (6, [5000, 4097], True), (3, None, False)])
def test_split_kv_decode_kernel_two_x_rule(m, lengths, causal):
    """The Triton split-KV decoding kernel (GQA 32/8, d 128, bf16, ragged batches, lengths
    not multiples of the split) within 2x the error of plain bf16 attention, both against
    the float64 reference."""
    from megatron_apb.ops.decode_kernel import kernel_available, split_kv_attention

    g = torch.Generator(device="cuda").manual_seed(m)
    b, L, h, kvh, d = 2, 5000, 32, 8, 128
    q = torch.randn(b, m, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, L, kvh, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, L, kvh, d, device="cuda", dtype=torch.bfloat16, generator=g)
    assert kernel_available(q)
    lens = torch.tensor(lengths or [L, L], device="cuda")
    out, lse = split_kv_attention(q, k, v, lengths=lens, causal=causal)
    scale = 1 / math.sqrt(d)
    for i in range(b):
        n = int(lens[i])
        mask = causal_mask(m, n, device="cuda") if causal else None
        ref, ref_lse = reference_attention(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], mask, scale)
        ref64, _ = reference_attention(q[i : i + 1].double(), k[i : i + 1, :n].double(), v[i : i + 1, :n].double(), mask, scale)
        plain = _plain_bf16(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], mask, scale)
        err = (out[i : i + 1].double() - ref64).abs().max().item()
        base = (plain.double() - ref64).abs().max().item()
        assert err <= 2 * base + 1e-6, (err, base)
        assert (lse[i : i + 1] - ref_lse).abs().max().item() < 1e-2


@pytest.mark.parametrize("graph", [False, True])
def test_captured_decode_step_equals_growing_cache_step(graph):
    """The static decoding step, replayed from a CUDA graph or run eagerly, gives the
    growing-cache step's logits (fp32, TF32 off: 1e-4) and tokens, on one GPU."""
    from tests.distributed import run_distributed
    from tests.engine_workers import static_vs_dynamic_steps

    kwargs = dict(mode="apb", anchor_len=4, passing_len=3, query_prefix_len=0)
    ((err, ours, theirs, static_tokens, dynamic_tokens),) = run_distributed(
        static_vs_dynamic_steps, 1, 300, 12, kwargs, "cuda", graph)
    assert err <= 1e-4, err
    assert ours == theirs and static_tokens == dynamic_tokens


def test_engine_one_gpu_generation_matches_recompute():
    """One rank on one GPU: generate() decodes with the captured step by default."""
    from tests.distributed import run_distributed
    from tests.engine_workers import generate_vs_recompute
    from tests.test_engine import EXACT, LOSSLESS, _check

    results = run_distributed(generate_vs_recompute, 1, 1, 1, 37, 8, [EXACT, LOSSLESS], "cuda")
    _check(results, 37, 1, 8)


def test_batch_generation_on_one_gpu_equals_one_by_one():
    """Three prompts of different lengths decoded together (a captured batched step, ragged
    cache lengths) give each prompt's own greedy tokens, a stop token included."""
    from tests.distributed import run_distributed
    from tests.engine_workers import batch_vs_one_by_one

    kwargs = dict(mode="apb", anchor_len=4, passing_len=3, query_prefix_len=0)
    ((together, alone, errors),) = run_distributed(batch_vs_one_by_one, 1, 1, 1, 6, kwargs, "cuda")
    assert together == alone and len(errors) == 4


def test_sparse_kernel_two_x_rule():
    """The sparse prefill kernel (:mod:`megatron_apb.ops.sparse`) in bf16 against its float32
    masked reference: the CPU test's small mixed-pattern cases, then GQA 32/8, d 128, 64-key
    blocks, a length not a multiple of the block and a query offset, each pattern; and with
    a budget covering every key, dense attention (float64 reference)."""
    from megatron_apb.ops.sparse import (AShape, BlockSparse, VerticalSlash, build_index, index_mask,
                                         sparse_attention, sparse_reference_attention)
    from tests.test_sparse import _plain, kernel_checks

    kernel_checks("cuda", (torch.bfloat16,))
    g = torch.Generator(device="cuda").manual_seed(5)
    sq, sk, h, kvh, d = 3000, 3333, 32, 8, 128
    q = torch.randn(1, sq, h, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, sk, kvh, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, sk, kvh, d, device="cuda", generator=g).bfloat16()
    scale = 1 / math.sqrt(d)
    for p in (BlockSparse(topk=8), VerticalSlash(vertical_topk=200, slash_topk=300), AShape(sink=64, window=500),
              BlockSparse(topk=1000)):
        index = build_index(q, k, (p,) * h, scale)
        out, lse = sparse_attention(q, k, v, index, scale)
        ref, ref_lse = sparse_reference_attention(q.float(), k.float(), v.float(), index, scale)
        mask = index_mask(index)
        err = (out.float() - ref).abs().max().item()
        base = (_plain(q, k, v, mask, scale).float() - ref).abs().max().item()
        assert err <= 2 * base + 1e-6, (p, err, base)
        assert (lse - ref_lse).abs().max().item() < 1e-2, p
    dense = reference_attention(q.double(), k.double(), v.double(), causal_mask(sq, sk, device="cuda"), scale)
    err = (out.double() - dense[0]).abs().max().item()
    base = (_plain_bf16(q, k, v, causal_mask(sq, sk, device="cuda"), scale).double() - dense[0]).abs().max().item()
    assert err <= 2 * base, (err, base)


def test_deepspeed_init_inference_on_one_gpu(tmp_path):
    """megatron_apb.integrations.deepspeed on one GPU: two CP ranks share it (gloo), the
    Hugging Face model placed there by deepspeed.init_inference with the "apb" section;
    generate gives our engine's tokens, then the returned engine's forward gives the
    unsharded model's logits (fp32, TF32 off; bound as on CPU: tests/test_deepspeed.py)."""
    pytest.importorskip("deepspeed")
    from tests.deepspeed_workers import hf_ds_vs_engine, write_tiny_llama
    from tests.distributed import run_distributed

    path, heads, doc, query = write_tiny_llama(tmp_path)
    section = dict(mode="apb", anchor_len=10, passing_len=4, query_prefix_len=2)
    cases = [("apb_query_attention", dict(section), dict(section, cp_size=2))]
    results = run_distributed(hf_ds_vs_engine, 2, 1, 2, path, doc, query, 8, cases, heads, "cuda", timeout=600)
    for res in results:
        r = res["apb_query_attention"]
        assert r["device"] == "cuda" and r["cp"] == 2 and r["kind"] == "hf", r
        assert list(r["got"]) == list(r["want"]) == list(results[0]["apb_query_attention"]["got"]), r
        assert r["logit_err"] <= 1e-4, r
        assert r["ds_engine"] == "InferenceEngine" and r["forward_shape"][:2] == [1, len(doc) + len(query) + 8], r
        assert r["forward_err"] <= 1e-4 * max(1.0, r["forward_scale"]), r
        assert all(m and "exceeds the DeepSpeed config's max_out_tokens=256" in m for m in r["refused"]), r
