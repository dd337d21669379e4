"""APBConfig validation, layout resolution and the CPLayout helpers (pure Python, exact)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_apb import APBConfig, APBConfigError, CPLayout

# --------------------------------------------------------------------------------------
# Validation in __post_init__
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(mode="ring"), "mode"),
        (dict(compressor="snapkv"), "compressor"),
        (dict(backend="tensorrt"), "backend"),
        (dict(anchor_len=-1), "anchor_len"),
        (dict(passing_len=-5), "passing_len"),
        (dict(anchor_len=2.5), "anchor_len"),
        (dict(anchor_ratio=1.5), "anchor_ratio"),
        (dict(anchor_ratio=-0.1), "anchor_ratio"),
        (dict(passing_ratio=2.0), "passing_ratio"),
        (dict(passing_ratio=-1e-3), "passing_ratio"),
        (dict(smoothing_kernel=4), "smoothing_kernel"),
        (dict(smoothing_kernel=0), "smoothing_kernel"),
        (dict(query_prefix_len=-1), "query_prefix_len"),
        (dict(retaining_head_hidden=0), "retaining_head_hidden"),
        (dict(mode="star", passing_len=8), "passing_len"),
        (dict(mode="exact", anchor_len=8), "anchor_len"),
        (dict(mode="ulysses", anchor_len=1), "anchor_len"),
    ],
)
def test_bad_field_raises_naming_it(kwargs, field):
    with pytest.raises(APBConfigError, match=field) as info:
        APBConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # APBConfigError is a ValueError


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(mode="star"),
        dict(mode="star", passing_len=0),
        dict(mode="exact", anchor_len=0),
        dict(mode="ulysses"),
        dict(anchor_ratio=0.0, passing_ratio=1.0),
        dict(smoothing_kernel=1),
        dict(compressor="random", backend="flex", seed=3),
    ],
)
def test_good_configs_construct(kwargs):
    cfg = APBConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == value


def test_config_is_keyword_only_frozen_and_replace_revalidates():
    with pytest.raises(TypeError):
        APBConfig("apb")  # keyword-only
    cfg = APBConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = "star"
    assert cfg.replace(anchor_len=64).anchor_len == 64
    with pytest.raises(APBConfigError, match="mode"):
        cfg.replace(mode="bogus")


def test_uses_anchor():
    assert APBConfig(mode="apb").uses_anchor and APBConfig(mode="star").uses_anchor
    assert not APBConfig(mode="exact").uses_anchor and not APBConfig(mode="ulysses").uses_anchor


# --------------------------------------------------------------------------------------
# layout()
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block,anchor,passing", [(1024, 256, 128), (4096, 1024, 512), (100, 25, 12)])
def test_apb_default_sizes(block, anchor, passing):
    lay = APBConfig().layout(block, cp_size=4)
    assert (lay.mode, lay.block_len, lay.anchor_len, lay.passing_len) == ("apb", block, anchor, passing)
    assert lay.query_len == 0 and lay.query_start == 0


def test_apb_explicit_sizes_and_ratios():
    lay = APBConfig(anchor_len=100, passing_len=10).layout(1024, cp_size=2)
    assert (lay.anchor_len, lay.passing_len) == (100, 10)
    lay = APBConfig(anchor_ratio=0.5, passing_ratio=0.25).layout(1024, cp_size=2)
    assert (lay.anchor_len, lay.passing_len) == (512, 256)
    # anchor_ratio=1 would make the anchor a whole block: apb caps it below the block
    assert APBConfig(anchor_ratio=1.0).layout(64, cp_size=2).anchor_len == 63


@pytest.mark.parametrize("anchor_len", [1024, 1025, 5000])
def test_apb_anchor_as_long_as_block_points_to_star(anchor_len):
    with pytest.raises(APBConfigError, match="star") as info:
        APBConfig(anchor_len=anchor_len).layout(1024, cp_size=4)
    assert f"anchor_len={anchor_len}" in str(info.value)


def test_star_anchor_defaults_to_block():
    lay = APBConfig(mode="star").layout(1024, cp_size=4, query_len=10)
    assert (lay.mode, lay.anchor_len, lay.passing_len) == ("star", 1024, 0)
    assert lay.query_len == 0  # Star Attention never embeds the query
    assert APBConfig(mode="star", anchor_len=300).layout(1024, cp_size=4).anchor_len == 300


def test_star_anchor_longer_than_block_raises():
    with pytest.raises(APBConfigError, match="anchor_len=1025"):
        APBConfig(mode="star", anchor_len=1025).layout(1024, cp_size=4)


@pytest.mark.parametrize("passing_len", [1024, 1025, 10**6])
def test_passing_longer_than_block_is_clamped(passing_len):
    lay = APBConfig(passing_len=passing_len).layout(1024, cp_size=4)
    assert lay.passing_len == 1024


def test_query_placement_in_anchor():
    lay = APBConfig().layout(1024, cp_size=4, query_len=240)  # 16 + 240 = 256 fits exactly
    assert (lay.query_start, lay.query_len) == (16, 240)
    lay = APBConfig(query_prefix_len=24).layout(1024, cp_size=4, query_len=8)
    assert (lay.query_start, lay.query_len) == (24, 8)
    # query_in_anchor=False keeps the query out of the anchor
    lay = APBConfig(query_in_anchor=False).layout(1024, cp_size=4, query_len=8)
    assert lay.query_len == 0


def test_query_that_does_not_fit_raises():
    with pytest.raises(APBConfigError, match="query") as info:
        APBConfig(anchor_len=256).layout(1024, cp_size=4, query_len=241)  # 16 + 241 > 256
    msg = str(info.value)
    assert "241" in msg and "257" in msg  # says how long the anchor would have to be
    with pytest.raises(APBConfigError, match="query"):  # even a grown anchor stays below a block
        APBConfig().layout(1024, cp_size=4, query_len=1010)


def test_derived_anchor_grows_to_hold_the_query():
    lay = APBConfig().layout(1024, cp_size=4, query_len=241)  # 16 + 241 > block / 4
    assert (lay.anchor_len, lay.query_start, lay.query_len) == (257, 16, 241)
    assert APBConfig().layout(1024, cp_size=4, query_len=20).anchor_len == 256  # no growth


@pytest.mark.parametrize("mode", ["apb", "star", "exact", "ulysses"])
def test_single_rank_has_no_anchor_or_passing(mode):
    lay = APBConfig(mode=mode).layout(1000, cp_size=1, query_len=5)
    assert lay == CPLayout(mode=mode, block_len=1000)
    assert lay.anchor_len == 0 and lay.passing_len == 0 and not lay.first_rank_anchor


@pytest.mark.parametrize("mode", ["exact", "ulysses"])
def test_exact_modes_have_no_anchor(mode):
    assert APBConfig(mode=mode).layout(512, cp_size=4) == CPLayout(mode=mode, block_len=512)


def test_block_len_must_be_positive():
    with pytest.raises(APBConfigError, match="block length"):
        APBConfig().layout(0, cp_size=2)


# --------------------------------------------------------------------------------------
# layout_for()
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,cp_size", [(3, 4), (0, 1), (7, 8)])
def test_layout_for_too_few_tokens(num_tokens, cp_size):
    with pytest.raises(APBConfigError, match=f"{num_tokens} tokens"):
        APBConfig().layout_for(num_tokens, cp_size)


def test_layout_for_rejects_bad_cp_size():
    with pytest.raises(APBConfigError, match="context-parallel size"):
        APBConfig().layout_for(100, 0)


@pytest.mark.parametrize(
    "num_tokens,cp_size,block", [(4096, 4, 1024), (4097, 4, 1025), (4099, 4, 1025), (10, 3, 4), (4, 4, 1)]
)
def test_layout_for_pads_with_ceil_division(num_tokens, cp_size, block):
    lay = APBConfig(mode="exact").layout_for(num_tokens, cp_size)
    assert lay.block_len == block
    assert block * cp_size >= num_tokens > (block - 1) * cp_size


def test_layout_for_forwards_query_len():
    lay = APBConfig().layout_for(4096, 4, query_len=20)
    assert (lay.block_len, lay.anchor_len, lay.query_start, lay.query_len) == (1024, 256, 16, 20)


# --------------------------------------------------------------------------------------
# first_rank_anchor
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(compressor="query_attention"), True),
        (dict(compressor="retaining_head"), False),
        (dict(compressor="random"), False),
        (dict(compressor="query_attention", passing_len=0), False),
        (dict(compressor="query_attention", passing_ratio=0.0), False),
        (dict(compressor="query_attention", anchor_len=0), False),  # no anchor to hold
        (dict(mode="star", compressor="query_attention"), False),
    ],
)
def test_first_rank_anchor(kwargs, expected):
    assert APBConfig(**kwargs).layout(1024, cp_size=4).first_rank_anchor is expected


# --------------------------------------------------------------------------------------
# CPLayout helpers
# --------------------------------------------------------------------------------------


def test_cplayout_helpers_without_first_rank_anchor():
    lay = APBConfig(compressor="retaining_head").layout(1024, cp_size=4)
    assert not lay.first_rank_anchor
    assert [lay.anchor_len_on(r) for r in range(4)] == [0, 256, 256, 256]
    assert [lay.local_len(r) for r in range(4)] == [1024, 1280, 1280, 1280]
    assert [lay.block_start(r) for r in range(4)] == [0, 1024, 2048, 3072]
    assert [lay.anchor_visible_on(r) for r in range(4)] == [False, True, True, True]


def test_cplayout_helpers_with_first_rank_anchor():
    lay = APBConfig(compressor="query_attention").layout(1024, cp_size=4)
    assert lay.first_rank_anchor
    assert [lay.anchor_len_on(r) for r in range(4)] == [256, 256, 256, 256]
    assert [lay.local_len(r) for r in range(4)] == [1280] * 4
    assert [lay.block_start(r) for r in range(4)] == [0, 1024, 2048, 3072]
    # rank 0 holds the anchor only for scoring: its rows never attend to it
    assert [lay.anchor_visible_on(r) for r in range(4)] == [False, True, True, True]


def test_cplayout_helpers_plain():
    lay = CPLayout(mode="exact", block_len=7)
    assert [lay.anchor_len_on(r) for r in range(4)] == [0, 0, 0, 0]
    assert [lay.local_len(r) for r in range(4)] == [7] * 4
    assert [lay.block_start(r) for r in range(4)] == [0, 7, 14, 21]
