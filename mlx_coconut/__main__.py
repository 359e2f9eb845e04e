"""`python -m mlx_coconut ...`: the `mlx-coconut` command line (how the quickstart starts its child runs)."""

from .cli import entry

entry()
