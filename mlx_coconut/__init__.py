"""mlx-coconut: COCONUT (Chain of Continuous Thought) for Llama-architecture models in MLX."""

__version__ = "0.1.0"
