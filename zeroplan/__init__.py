"""zeroplan: per-GPU memory planning and DeepSpeed ZeRO configs for InternVL training.

The core (profiles, params, memory, steptime, planner, dsconfig) is plain Python: no torch,
deepspeed or transformers import. The heavy parts live in zeroplan.adapters and zeroplan.runner.
"""

__version__ = "0.1.0"
