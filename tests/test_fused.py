"""The fused RMSNorm and RoPE (ops.fused) against the unfused PyTorch chains they replace.

Tolerances: in fp32 both compute the same formula, so 1e-5 covers summation order on
values of order 1-10; in bf16, flash-attention's rule (the fused error against a float64
reference at most 2x the unfused chain's), plus 1e-6 for the case where both round the
same way and the chain's error is 0.

On CPU the fused functions run eagerly (the math is checked here); on CUDA they are
compiled, and tests/test_gpu.py checks the compiled kernels by the same rules.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_apb.megatron.rope import apply_rope
from megatron_apb.ops.fused import fused_rms_norm, fused_rope
from tests.distributed import run_distributed


def _freqs(s, d, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2).double() / d)
    angles = torch.arange(s).double()[:, None] * inv[None]
    return torch.cat([angles, angles], dim=-1).float()


def test_rms_norm_matches_torch_and_the_two_x_rule():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 64, generator=g) * 3, torch.randn(64, generator=g)
    assert (fused_rms_norm(x, w, 1e-5) - F.rms_norm(x, (64,), w, 1e-5)).abs().max() <= 1e-5
    ref = F.rms_norm(x.double(), (64,), w.double(), 1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    fused_err = (fused_rms_norm(xb, wb, 1e-5).double() - ref).abs().max()
    torch_err = (F.rms_norm(xb, (64,), wb, 1e-5).double() - ref).abs().max()
    assert fused_rms_norm(xb, wb, 1e-5).dtype == torch.bfloat16
    assert fused_err <= 2 * torch_err + 1e-6, (fused_err, torch_err)


@pytest.mark.parametrize("d", [8, 64, 128])
def test_rope_matches_the_unfused_chain_and_the_two_x_rule(d):
    g = torch.Generator().manual_seed(d)
    x, freqs = torch.randn(2, 17, 3, d, generator=g), _freqs(17, d)
    assert (fused_rope(x, freqs) - apply_rope(x, freqs)).abs().max() <= 1e-5
    ref = apply_rope(x.double(), freqs.double())
    fused_err = (fused_rope(x.bfloat16(), freqs).double() - ref).abs().max()
    chain_err = (apply_rope(x.bfloat16(), freqs).double() - ref).abs().max()
    assert fused_err <= 2 * chain_err + 1e-6, (fused_err, chain_err)


def test_rope_refuses_partial_rotary():
    with pytest.raises(ValueError, match="apply_rope for partial rotary"):
        fused_rope(torch.zeros(1, 4, 2, 16), _freqs(4, 8))


def test_config_and_spec_validate_the_fused_options():
    from megatron_apb import APBConfig
    from megatron_apb.config import APBConfigError
    from megatron_apb.megatron.spec import get_gpt_layer_apb_spec

    with pytest.raises(APBConfigError, match="fused_rope must be True or False"):
        APBConfig(fused_rope="yes")
    with pytest.raises(ValueError, match="fused_norm fuses RMSNorm"):
        get_gpt_layer_apb_spec(APBConfig(), normalization="LayerNorm", fused_norm=True)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_default_spec_fuses_rmsnorm_only(normalization):
    """By default the spec fuses the norms of RMSNorm configs and leaves others to
    Megatron, also when the spec is built before the config is known (Megatron-LM)."""
    from megatron_apb import APBConfig
    from megatron_apb.megatron import tiny_transformer_config
    from megatron_apb.megatron.norms import FusedRMSNorm
    from megatron_apb.megatron.spec import get_gpt_layer_apb_spec

    assert APBConfig().fused_rope
    config = tiny_transformer_config(normalization=normalization)
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        norm = getattr(get_gpt_layer_apb_spec(APBConfig()).submodules, name)(config, 96, 1e-5)
        if normalization == "RMSNorm":
            assert isinstance(norm, FusedRMSNorm)
        else:
            assert isinstance(norm, torch.nn.LayerNorm)
        plain = getattr(get_gpt_layer_apb_spec(APBConfig(), fused_norm=False).submodules, name)
        assert type(plain(config, 96, 1e-5)) is not FusedRMSNorm


@pytest.mark.parametrize("world", [1, 2])
def test_model_with_fused_norm_and_rope_gives_the_same_answers(world):
    from tests.megatron_workers import fused_vs_plain

    for err, plain, fused in run_distributed(fused_vs_plain, world, 20):
        assert plain == fused
        if world == 1:
            assert err <= 1e-5, err
