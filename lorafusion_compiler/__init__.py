"""Implementation of lorafusion (users import ``lorafusion``).

Rooms: ``passes/`` (find and rewrite LoRA sites in Dynamo graphs), ``ops/`` (the
``torch.ops.lorafusion`` operators and their torch reference), ``codegen/`` (Triton kernels
from templates), ``runtime/`` (multi-adapter batches, models and the pipeline), ``scheduler/``
(microbatch planning), ``product/`` (tiny model, shipped data, demos, ``lorafusion train``);
``backend.py``, ``config.py``, ``report.py``, ``explain.py``, ``dump.py`` tie them together.
"""
