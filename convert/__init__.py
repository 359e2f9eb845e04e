"""Weight converters (installed as ``mlx_coconut.convert``): HF safetensors / GGUF -> MLX."""
