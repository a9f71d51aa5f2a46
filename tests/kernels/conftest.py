"""Kernel tests run in the Triton interpreter when no CUDA device exists.

TRITON_INTERPRET must be set before anything imports triton (torch._dynamo does), so
it is set here, at import, before torch is imported.
"""

import os
import shutil
import tempfile

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LORAFUSION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "lorafusion-test-kernels"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> str:
    """'cuda' when a GPU is present, else 'cpu' (kernels then run in the Triton interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
