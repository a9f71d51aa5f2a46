"""The ``torch.ops.lorafusion`` operators and the torch reference of their kernels."""

from .dropout_mask import keep_mask
from .kernel_set import KERNEL_SETS, get_kernel_set
from .lora_linear import lora_linear, lora_linear_backward

__all__ = ["KERNEL_SETS", "get_kernel_set", "keep_mask", "lora_linear", "lora_linear_backward"]
