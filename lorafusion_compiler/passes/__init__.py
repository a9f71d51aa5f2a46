"""FX passes: find LoRA sites in Dynamo graphs and rewrite them into lorafusion ops."""

from .lora_pattern import LoRASite, PatternResult, SkippedLinear, find_lora_sites
from .rewrite import rewrite_lora_sites

__all__ = ["LoRASite", "PatternResult", "SkippedLinear", "find_lora_sites", "rewrite_lora_sites"]
