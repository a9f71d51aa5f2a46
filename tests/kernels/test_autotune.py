"""The tuner's fallback: a tile config that does not fit the GPU is skipped, not fatal."""

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

    assert _first_that_fits([_cfg(256), _cfg(128), _cfg(64), _cfg(32)], launch) == "ran with 64"
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
