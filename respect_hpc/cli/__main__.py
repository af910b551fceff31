"""``python -m respect_hpc.cli``: the same command as ``respect-hpc``."""

from respect_hpc.cli import app

app()
