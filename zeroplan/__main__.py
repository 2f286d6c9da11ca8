"""`python -m zeroplan ...`: the CLI without the console script (used on machines where zeroplan
runs from a checkout on PYTHONPATH)."""

from zeroplan.cli.main import app

app()
