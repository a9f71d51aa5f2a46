"""The embedded default model: a tiny LLaMa built from a config (no downloads) + PEFT LoRA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TinyLlamaConfig", "LORA_TARGETS", "build_tiny_llama", "add_lora"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""All seven projections of a LLaMa decoder layer."""


@dataclass(frozen=True, kw_only=True)
class TinyLlamaConfig:
    """Shape of the embedded LLaMa; byte-level vocabulary (256 tokens)."""

    hidden_size: int = 64
    """Model width (features per token)."""
    intermediate_size: int = 128
    """MLP width."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    max_positions: int = 512
    """Longest sequence in tokens."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                f"which must divide by num_kv_heads={self.num_kv_heads}"
            )


def build_tiny_llama(config: TinyLlamaConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised ``LlamaForCausalLM`` (transformers) of the given shape, frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TinyLlamaConfig()
    hf_config = LlamaConfig(
        vocab_size=256,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_positions,
        attn_implementation="eager",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(hf_config).to(dtype)
    model.requires_grad_(False)
    return model


def add_lora(model, *, rank: int = 8, alpha: float = 16, dropout: float = 0.0, targets=LORA_TARGETS, seed: int = 0, use_rslora: bool = False):
    """Wrap ``model`` with one PEFT LoRA adapter on ``targets``; B is random (not zero) so tests see every gradient."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), use_rslora=use_rslora)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    return peft_model
