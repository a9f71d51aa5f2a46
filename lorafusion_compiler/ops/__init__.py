"""The ``torch.ops.lorafusion`` operators and the torch reference of their kernels."""

from .dropout_mask import keep_mask
from .kernel_set import KERNEL_SETS, get_kernel_set
from .lora_linear import lora_linear, lora_linear_backward
from .lora_linear_shared import lora_linear_shared, lora_linear_shared_backward

__all__ = ["KERNEL_SETS", "get_kernel_set", "keep_mask", "lora_linear", "lora_linear_backward", "lora_linear_shared",
           "lora_linear_shared_backward"]
