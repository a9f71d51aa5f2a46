"""One-stage pipeline on a GPU: the stage recorded as CUDA graphs trains what the plain compiled stage trains."""

from __future__ import annotations

import pytest
import torch
from test_pipeline_single import CAPACITY, GREEDY, PAD, TINY, adapter_state, assert_states_close, make_jobs

from lorafusion_compiler.product.tiny_llama import build_tiny_llama
from lorafusion_compiler.runtime.pipeline import pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cudagraphs_stage_matches_plain_compiled_stage():
    from torch._dynamo.utils import counters

    def run(cudagraphs: bool):
        jobs = make_jobs(3)
        for job in jobs:
            job.dropout = 0.1
        return pipeline(build_tiny_llama(TINY, seed=0), jobs, capacity=CAPACITY, pad_multiple=PAD, schedule_options=GREEDY,
                        progress=False, device="cuda", cudagraphs=cudagraphs)

    torch._dynamo.reset()
    plain = run(False)
    torch._dynamo.reset()
    counters.clear()
    graphed = run(True)
    assert counters["inductor"]["cudagraph_skips"] == 0, "the stage was not recorded as CUDA graphs"
    for job in make_jobs(3):
        assert graphed.losses[job.name] == pytest.approx(plain.losses[job.name], rel=1e-4)
        assert_states_close(adapter_state(graphed.model, job.name), adapter_state(plain.model, job.name), atol=1e-4)
