"""A post-grad pass that changes nothing but Inductor's on-disk FX-graph cache key.

Inductor caches compiled graphs keyed by the graph's code, which names our custom ops but not
their schemas: after an upgrade that changes what an op returns, a cached graph would unpack
the new outputs with the old code (``assert_size_stride`` failures). The ``uuid`` of this pass
is a hash of every registered ``lorafusion::`` schema, and Inductor folds a custom pass's uuid
into its key, so the key changes whenever one of our schemas does.
"""

from __future__ import annotations

import hashlib

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..ops import lora_linear as _lora_ops  # noqa: F401  (registers the ops whose schemas are hashed)
from ..ops import lora_linear_shared as _shared_ops  # noqa: F401
from ..ops import multi_lora_linear as _multi_ops  # noqa: F401
from ..ops import multi_routing as _routing_ops  # noqa: F401

__all__ = ["SchemaSalt", "schema_fingerprint"]


def schema_fingerprint() -> str:
    """sha256 of the sorted schemas of every registered ``lorafusion::`` operator."""
    schemas = sorted(str(s) for s in torch._C._jit_get_all_schemas() if s.name.startswith("lorafusion::"))
    return hashlib.sha256("\n".join(schemas).encode()).hexdigest()


class SchemaSalt(CustomGraphPass):
    """Inductor ``post_grad_custom_post_pass`` that leaves the graph alone (module docstring)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return schema_fingerprint()
