"""Weight converters (installed as ``mlx_coconut.convert``): HF safetensors / GGUF -> MLX."""

from .gguf import load_gguf, unpermute
from .hf import load_hf
from .save import convert, quantize_weights, save_weights

__all__ = ["convert", "load_gguf", "load_hf", "quantize_weights", "save_weights", "unpermute"]
