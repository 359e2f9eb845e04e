"""The `mlx-coconut` commands, one module per group; cli.py assembles them."""
