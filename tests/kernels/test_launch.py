"""``codegen.launch``: the specialisation key of the cached launch (CPU; the launch itself runs in
every GPU kernel test)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lorafusion_compiler.codegen.launch import arg_signature, launch


@dataclass
class _Descriptor:
    base: torch.Tensor
    block_shape: list[int]
    layout: object = None


def test_arg_signature_separates_what_triton_specialises_on():
    t = torch.empty(64, dtype=torch.float32)
    assert arg_signature((t,)) == arg_signature((torch.empty(8, dtype=torch.float32),))
    assert arg_signature((t,)) != arg_signature((t.to(torch.float16),))
    assert arg_signature((t,)) != arg_signature((t[1:],))  # 4-byte offset: not 16-byte aligned
    assert arg_signature((16,)) == arg_signature((32,))
    assert arg_signature((16,)) != arg_signature((17,))
    assert arg_signature((1,)) != arg_signature((17,))
    assert arg_signature((2**31,)) != arg_signature((16,))
    assert arg_signature((True,)) != arg_signature((1,)) and arg_signature((True,)) != arg_signature((False,))
    assert arg_signature((1.0,)) == arg_signature((3.5,))


def test_arg_signature_keys_descriptors_on_dtype_block_layout_and_alignment():
    base = torch.empty(128, 64, dtype=torch.bfloat16)
    key = arg_signature((_Descriptor(base, [64, 32]),))
    assert key == arg_signature((_Descriptor(torch.empty(256, 64, dtype=torch.bfloat16), [64, 32]),))
    assert key != arg_signature((_Descriptor(base, [64, 64]),))
    assert key != arg_signature((_Descriptor(base.float(), [64, 32]),))
    assert key != arg_signature((_Descriptor(base, [64, 32], layout="swizzle64"),))


def test_empty_grid_launches_nothing():
    def kernel_never_called(*args, **kwargs):
        pytest.fail("an empty grid must not reach the kernel")

    assert launch(kernel_never_called, (0, 4), (), {}, {}) is None
