"""The tuner's fallback: a tile config that does not fit the GPU is skipped, not fatal; configs whose
operand ring cannot fit are tried last."""

import pytest
from triton.runtime.errors import OutOfResources

from lorafusion_compiler.codegen.autotune import TileConfig, _first_that_fits


def _cfg(block_m: int) -> TileConfig:
    return TileConfig(blocks=(("BLOCK_M", block_m),))


def test_first_config_that_fits_is_used():
    tried = []

    def launch(cfg):
        tried.append(cfg["BLOCK_M"])
        if cfg["BLOCK_M"] > 64:
            raise OutOfResources(245760, 232448, "shared memory")
        return f"ran with {cfg['BLOCK_M']}"

    cands = [_cfg(256), _cfg(128), _cfg(64), _cfg(32)]
    assert _first_that_fits(cands, launch) == (cands[2], "ran with 64")
    assert tried == [256, 128, 64]


def test_no_config_fits_reraises_the_resource_error():
    def launch(cfg):
        raise OutOfResources(245760, 232448, "shared memory")

    with pytest.raises(OutOfResources, match="shared memory"):
        _first_that_fits([_cfg(128), _cfg(64)], launch)


def test_other_errors_are_not_swallowed():
    def launch(cfg):
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        _first_that_fits([_cfg(128), _cfg(64)], launch)


def _tune_with_timings(monkeypatch, script: dict[int, list[float]]):
    """run_tuned over three candidates (BLOCK_M 32/64/128) whose timing rounds come from ``script``
    (a NaN-raising entry stands for a launch that does not fit); returns (result, calls per config)."""
    from lorafusion_compiler.codegen import autotune

    cands = (_cfg(32), _cfg(64), _cfg(128))
    monkeypatch.setattr(autotune, "configs", lambda kernel, rb: cands)
    monkeypatch.setattr(autotune, "_CHOICES", {})
    monkeypatch.setattr(autotune, "_smem_limit", lambda: None)
    monkeypatch.setattr(autotune.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("LORAFUSION_TUNE_MAX", raising=False)
    rounds = {bm: iter(ts) for bm, ts in script.items()}
    timed = []

    def fake_gpu_ms(fn):
        cfg_bm = fn()
        timed.append(cfg_bm)
        t = next(rounds[cfg_bm])
        if t != t:
            raise OutOfResources(245760, 232448, "shared memory")
        return t

    monkeypatch.setattr(autotune, "_gpu_ms", fake_gpu_ms)
    result = autotune.run_tuned("da", "key", (1000, 16), 16, lambda cfg: cfg["BLOCK_M"])
    return result, timed


def test_tuner_keeps_each_candidates_best_round(monkeypatch):
    # 64 is slowest in round 1 (a clock dip) but fastest overall: the best round counts, not the first
    result, timed = _tune_with_timings(monkeypatch, {32: [1.0, 1.0], 64: [1.5, 0.8], 128: [0.9, 0.95]})
    assert result == 64
    assert timed == [32, 64, 128, 32, 64, 128]  # interleaved rounds


@pytest.mark.parametrize("capturing", [False, True])
def test_single_candidate_fallback_is_kept_outside_a_capture(monkeypatch, capturing):
    """With one candidate (LORAFUSION_TUNE_MAX=1) the first config that fits is kept, so later calls
    do not retry the ones that did not fit; inside a CUDA-graph capture nothing is kept."""
    from lorafusion_compiler.codegen import autotune

    cands = (_cfg(128), _cfg(64))
    monkeypatch.setattr(autotune, "configs", lambda kernel, rb: cands)
    monkeypatch.setattr(autotune, "_CHOICES", {})
    monkeypatch.setattr(autotune, "_smem_limit", lambda: None)
    monkeypatch.setattr(autotune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(autotune.torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setenv("LORAFUSION_TUNE_MAX", "1")
    tried = []

    def launch(cfg):
        tried.append(cfg["BLOCK_M"])
        if cfg["BLOCK_M"] > 64:
            raise OutOfResources(245760, 232448, "shared memory")
        return cfg["BLOCK_M"]

    assert [autotune.run_tuned("da", "key", (1000, 16), 16, launch) for _ in range(3)] == [64, 64, 64]
    assert tried == ([128, 64] * 3 if capturing else [128, 64, 64, 64])
    assert list(autotune.tuned_choices().values()) == ([] if capturing else [cands[1]])


def test_tuner_skips_a_candidate_that_does_not_fit_in_later_rounds(monkeypatch):
    result, timed = _tune_with_timings(monkeypatch, {32: [1.0, 1.0], 64: [float("nan")], 128: [2.0, 0.5]})
    assert result == 128
    assert timed == [32, 64, 128, 32, 128]


def test_config_description_names_blocks_warps_stages_persistence_and_split():
    assert TileConfig((("BLOCK_M", 128),), 8, 3, True).describe() == "{'BLOCK_M': 128} w8 s3 persistent"
    assert _cfg(64).describe() == "{'BLOCK_M': 64} w4 s3"
    assert TileConfig((("BLOCK_M", 64),), split_per_sm=4).describe() == "{'BLOCK_M': 64} w4 s3 split/SM 4"


def test_split_kernels_also_try_the_first_config_with_1_and_4_programs_per_sm(monkeypatch):
    from lorafusion_compiler.codegen import autotune

    monkeypatch.setattr(autotune, "interpreting", lambda: False)  # the GPU candidate lists
    autotune.configs.cache_clear()
    try:
        for kernel in autotune.SPLIT_KERNELS:
            cands = autotune.configs(kernel, 16)
            assert [c.split_per_sm for c in cands[-2:]] == [1, 4], kernel
            assert all(c.blocks == cands[0].blocks and c.num_warps == cands[0].num_warps for c in cands[-2:]), kernel
            # dA also lists its pipelined 32x128 tile at 4 programs per SM (autotune._configs)
            assert {c.split_per_sm for c in cands[:-2]} == ({2, 4} if kernel == "da" else {2}), kernel
        assert {c.split_per_sm for c in autotune.configs("dx", 16)} == {2}  # GEMMs do not split
    finally:
        autotune.configs.cache_clear()


@pytest.mark.parametrize("per_sm, want", [(1, 1), (2, 1), (4, 2), (8, 4), (64, 32)])
def test_split_aims_at_the_configured_programs_per_sm(per_sm, want):
    import torch

    from lorafusion_compiler.codegen.kernels import _split

    cfg = TileConfig((("BLOCK_M", 64),), split_per_sm=per_sm)
    # 2 SMs on the CPU stand-in, 4 programs along the other axis: ceil(2 * per_sm / 4), a power of two,
    # at most the 32 blocks there are to split
    assert _split(32, 4, torch.device("cpu"), cfg) == want


def _gemm_cfg(block_m: int, block_p: int, stages: int) -> TileConfig:
    return TileConfig((("BLOCK_M", block_m), ("BLOCK_P", block_p), ("BLOCK_Q", 64)), 8, stages)


def test_ring_bytes_counts_the_stages_of_the_main_operand_tiles():
    from lorafusion_compiler.codegen.autotune import ring_bytes

    # 3 stages of x [128, 64] and W [64, 256]: 147456 bytes in bf16, 294912 in fp32 (over H100's 232448)
    assert ring_bytes("dx", _gemm_cfg(128, 256, 3), 2) == 147456
    assert ring_bytes("base_expand", _gemm_cfg(128, 256, 3), 4) == 294912
    assert ring_bytes("da", TileConfig((("BLOCK_M", 64), ("BLOCK_K", 128)), 4, 3), 4) == 3 * 64 * 128 * 4
    assert ring_bytes("ds_db", TileConfig((("BLOCK_M", 128), ("BLOCK_N", 64)), 8, 4), 2) == 4 * 128 * 64 * 2


def _tune_gemm(monkeypatch, cands, *, operand_bytes: int, tune_max: int = 0, fails=(), timed: bool = True):
    """run_tuned("dx") over ``cands`` on a fake GPU with H100's shared memory; launches of configs in
    ``fails`` run out of resources. ``timed``: dX is tuned like the split kernels (not in ``UNTIMED_KERNELS``),
    for the tests of the shared-memory estimate. Returns (result, configs launched in order)."""
    from lorafusion_compiler.codegen import autotune

    if timed:
        monkeypatch.setattr(autotune, "UNTIMED_KERNELS", ())
    monkeypatch.setattr(autotune, "configs", lambda kernel, rb: tuple(cands))
    monkeypatch.setattr(autotune, "_CHOICES", {})
    monkeypatch.setattr(autotune, "_smem_limit", lambda: 232448)
    monkeypatch.setattr(autotune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(autotune.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("LORAFUSION_TUNE_MAX", str(tune_max))
    launched = []

    def launch(cfg):
        launched.append(cfg)
        if cfg in fails:
            raise OutOfResources(300000, 232448, "shared memory")
        return cfg

    monkeypatch.setattr(autotune, "_gpu_ms", lambda fn: 1.0 / fn()["BLOCK_P"])  # wider tiles "faster"
    return autotune.run_tuned("dx", "key", (1000, 16, 16), 16, launch, operand_bytes=operand_bytes), launched


def test_fp32_operands_skip_the_tiles_whose_ring_overflows_before_compiling_them(monkeypatch):
    big, small = _gemm_cfg(128, 256, 3), _gemm_cfg(128, 128, 3)  # fp32 rings: 294912 and 196608 bytes
    # one candidate (LORAFUSION_TUNE_MAX=1): the first that can fit is launched first, nothing else
    result, launched = _tune_gemm(monkeypatch, [big, small], operand_bytes=4, tune_max=1)
    assert result == small and launched == [small]
    # full tuning: only the ones that can fit are timed
    result, launched = _tune_gemm(monkeypatch, [big, small], operand_bytes=4)
    assert result == small and big not in launched
    # bf16 operands: both fit and are timed; the faster (wider) one wins
    result, launched = _tune_gemm(monkeypatch, [big, small], operand_bytes=2)
    assert result == big and small in launched


def test_the_estimate_only_orders_a_config_that_might_fit_after_all_is_still_tried(monkeypatch):
    big, small = _gemm_cfg(128, 256, 3), _gemm_cfg(128, 128, 3)
    # every config predicted to overflow: they are tried anyway, in the given order
    result, launched = _tune_gemm(monkeypatch, [big], operand_bytes=8, tune_max=1)
    assert result == big and launched == [big]
    # the predicted-to-fit ones fail to launch: the others are tried before giving up
    result, launched = _tune_gemm(monkeypatch, [big, small], operand_bytes=4, fails=(small,))
    assert result == big and launched[-1] == big


def test_fused_gemms_keep_their_first_config_that_fits_untimed(monkeypatch):
    """base_expand and dX are not timed (``UNTIMED_KERNELS``): the first config that fits is launched and kept,
    even where a later one would time faster (the wider tile, here), and even without LORAFUSION_TUNE_MAX."""
    from lorafusion_compiler.codegen import autotune

    small, big = _gemm_cfg(128, 128, 3), _gemm_cfg(128, 256, 3)
    result, launched = _tune_gemm(monkeypatch, [small, big], operand_bytes=2, timed=False)
    assert result == small and launched == [small]
    assert autotune.tuned_choices() == {("dx", "key", 1024, (16, 16)): small}
    # fp32 operands: the first config predicted to fit comes first
    result, launched = _tune_gemm(monkeypatch, [big, small], operand_bytes=4, timed=False)
    assert result == small and launched == [small]
    assert set(autotune.UNTIMED_KERNELS) == {"base_expand", "dx"}
