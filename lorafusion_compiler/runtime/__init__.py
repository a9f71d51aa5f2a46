"""Runtime: adapter-tagged batches and multi-adapter models."""

from .adapter_batch import AdapterBatch
from .multi_adapter import MultiAdapterModel

__all__ = ["AdapterBatch", "MultiAdapterModel"]
