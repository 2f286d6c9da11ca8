"""The bundled runner: real InternVL training under a zeroplan plan, measured.

`launch` builds the command line for a `zeroplan.core.run.RunSpec`; `train` is the per-rank entry
point (`python -m zeroplan.runner.train --spec S --result R`); `data` and `measure` sit beside the loop.
"""
