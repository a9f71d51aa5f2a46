"""The Gluon warp-specialised GEMM: argument checks (any machine) and results against a float64
torch reference on a Hopper GPU (Gluon has no interpreter, so those cases need sm_90)."""

import pytest
import torch

from lorafusion_compiler.codegen.gluon import DEFAULT_CONFIGS, GemmConfig, gemm
from lorafusion_compiler.codegen.gluon.ws_gemm import check_operands

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="Gluon kernels run on a Hopper GPU only (no interpreter)")


def _bf16(*shape, device="cpu"):
    return torch.randn(*shape, device=device).to(torch.bfloat16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="split_k"), "variant='split_k' must be 'ws_coop' or 'ws_pingpong'"),
    (dict(block_m=96), "block_m=96 gives 48 rows per warpgroup"),
    (dict(block_n=264), "block_n=264 must be a multiple of 8 and <= 256"),
    (dict(block_k=40), "block_k=40 must be a multiple of 16"),
    (dict(epi_n=32), "epi_n=32 must split block_n=256 into 1, 2 or 4 stores"),
    (dict(stages=1), "stages=1 must be >= 2"),
    (dict(stages=8), "lower stages=8"),
    (dict(consumer_regs=250), "consumer_regs=250 must be a multiple of 8"),
    (dict(consumer_regs=256, loader_regs=56), "exceed the 65,536 registers"),
])
def test_config_errors_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GemmConfig(**kwargs)


def test_default_configs_fit_shared_memory():
    assert {c.variant for c in DEFAULT_CONFIGS.values()} == {"ws_coop", "ws_pingpong"}
    assert all(c.smem_bytes < 232448 for c in DEFAULT_CONFIGS.values())


@pytest.mark.parametrize("a, b, layout, message", [
    (_bf16(16, 32), _bf16(24, 32), "tn", "b_layout='tn' must be 'nt'"),
    (_bf16(16, 32).float(), _bf16(24, 32), "nt", "a must be a 2-D torch.bfloat16 tensor, got torch.float32"),
    (_bf16(16, 36), _bf16(24, 36), "nt", "R=36"),
    (_bf16(16, 32), _bf16(20, 32), "nt", "N=20"),
    (_bf16(16, 32), _bf16(24, 40), "nt", "but b \\(nt\\) has R=40"),
    (_bf16(16, 32), _bf16(40, 24), "nn", "but b \\(nn\\) has R=40"),
    (_bf16(32, 16).t(), _bf16(24, 32), "nt", "a must be row-major"),
])
def test_operand_errors_name_the_bad_value(a, b, layout, message):
    with pytest.raises(ValueError, match=message):
        check_operands(a, b, layout)


def test_operand_shapes_in_both_layouts():
    assert check_operands(_bf16(16, 32), _bf16(24, 32), "nt") == (16, 24, 32)
    assert check_operands(_bf16(16, 32), _bf16(32, 24), "nn") == (16, 24, 32)


@pytest.mark.skipif(HOPPER, reason="checks the refusal off Hopper")
def test_refuses_to_run_off_hopper():
    with pytest.raises(ValueError, match="needs a Hopper \\(sm_90\\) GPU; a is on cpu"):
        gemm(_bf16(16, 32), _bf16(24, 32), b_layout="nt")


@needs_hopper
@pytest.mark.parametrize("variant", sorted(DEFAULT_CONFIGS))
@pytest.mark.parametrize("layout", ["nt", "nn"])
@pytest.mark.parametrize("m, r, n", [(1000, 4000, 3000), (264, 72, 136), (8, 8, 8), (2048, 4096, 4096)])
def test_matches_float64_reference(variant, layout, m, r, n):
    torch.manual_seed(m + r + n)
    a = _bf16(m, r, device="cuda")
    b = _bf16(n, r, device="cuda") if layout == "nt" else _bf16(r, n, device="cuda")
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)  # an unwritten tile fails
    got = gemm(a, b, b_layout=layout, out=out, config=DEFAULT_CONFIGS[variant])
    want = a.double() @ (b.double().t() if layout == "nt" else b.double())
    err = (got.double() - want).abs().max() / want.abs().max()
    assert got is out and err <= 1e-2, f"{variant} {layout} {m}x{r}x{n}: max error / max |ref| = {err:.2e}"


@needs_hopper
def test_repeated_calls_are_bitwise_equal():
    a, b = _bf16(2048, 4096, device="cuda"), _bf16(4096, 4096, device="cuda")
    first = gemm(a, b, b_layout="nn", config=DEFAULT_CONFIGS["ws_pingpong"])
    assert all(torch.equal(first, gemm(a, b, b_layout="nn", config=DEFAULT_CONFIGS["ws_pingpong"])) for _ in range(3))
