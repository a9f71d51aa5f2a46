"""LoRAFusionConfig: options, LORAFUSION_* environment overrides, validation."""

import pytest

from lorafusion_compiler.config import LoRAFusionConfig


def test_defaults():
    config = LoRAFusionConfig.from_options(None, environ={})
    assert config == LoRAFusionConfig()
    assert config.inner_backend == "inductor" and config.kernels == "auto" and config.rewrite and not config.deterministic


def test_env_then_options_precedence():
    env = {"LORAFUSION_KERNELS": "torch", "LORAFUSION_DETERMINISTIC": "yes", "LORAFUSION_DUMP_DIR": "/tmp/k"}
    config = LoRAFusionConfig.from_options({}, environ=env)
    assert (config.kernels, config.deterministic, config.dump_dir) == ("torch", True, "/tmp/k")
    config = LoRAFusionConfig.from_options({"kernels": "triton", "deterministic": False}, environ=env)
    assert (config.kernels, config.deterministic, config.dump_dir) == ("triton", False, "/tmp/k")


def test_config_is_frozen():
    with pytest.raises(Exception):
        LoRAFusionConfig().kernels = "torch"


@pytest.mark.parametrize(
    "options, env, message",
    [
        ({"kernel": "torch"}, {}, r"unknown lorafusion option\(s\) \['kernel'\]"),
        ({"kernels": "cuda"}, {}, "kernels='cuda'"),
        ({"deterministic": "yes"}, {}, "deterministic='yes'"),
        ({}, {"LORAFUSION_REWRITE": "maybe"}, "LORAFUSION_REWRITE='maybe'"),
        ({"inner_backend": ""}, {}, "inner_backend=''"),
        ({"cudagraphs": 1}, {}, "cudagraphs=1"),
        ({"cudagraphs": True, "inner_backend": "aot_eager"}, {}, "inner_backend='aot_eager'"),
    ],
)
def test_bad_values_are_named(options, env, message):
    with pytest.raises(ValueError, match=message):
        LoRAFusionConfig.from_options(options, environ=env)
