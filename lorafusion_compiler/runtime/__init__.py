"""Runtime: adapter-tagged batches, multi-adapter models, the packer and the multi-job pipeline."""

from .adapter_batch import AdapterBatch
from .distributed import RemoteRankError
from .jobs import PipelineJob
from .multi_adapter import MultiAdapterModel
from .pipeline import PipelineResult, pipeline

__all__ = ["AdapterBatch", "MultiAdapterModel", "PipelineJob", "PipelineResult", "RemoteRankError", "pipeline"]
