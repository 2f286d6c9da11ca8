"""The bundled runner: real InternVL training under a zeroplan plan, measured.

`launch` builds the command line for a `zeroplan.core.run.RunSpec`; `train` is the per-rank entry
point and its loop (`python -m zeroplan.runner.train --spec S --result R`); `hf_trainer` the same
run through transformers' Trainer (RunSpec.trainer "hf"); `record` the result both write and how a
rank leaves; `data`, `model` and `measure` sit beside the loop.
"""
