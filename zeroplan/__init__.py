"""zeroplan: per-GPU memory planning and DeepSpeed ZeRO configs for InternVL training.

Layers, each importing only those below it (tests/test_layers.py holds the contract):
`core` (pure estimation over plain data: profiles, memory, step time, planning, config rendering;
no torch, deepspeed or transformers), `adapters` (DeepSpeed, transformers, NVML), `runner` (real
InternVL training under a plan, measured), `lab` (sweeps, results, calibration, reports) and `cli`
(one module per verb). The model and GPU profiles ship as package data under `profiles/`.
"""

__version__ = "0.1.0"
