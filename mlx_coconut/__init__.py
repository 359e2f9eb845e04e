"""mlx-coconut: COCONUT (Chain of Continuous Thought) for Llama-architecture models in MLX.

Public API (imported lazily, so `import mlx_coconut` stays cheap):
    load(path, dtype=None) -> Loaded(model, tokenizer, settings, path)
    generate_answers(loaded, questions, max_tokens=64, temp=0.0, top_p=1.0, batch_size=16,
                     return_thoughts=False, on_token=None) -> [Answer]
    describe_thoughts(loaded, thoughts, k=5), batch_loss(loaded, records), prompt_ids(loaded, q)
    loss_fn / generate / continuous_forward: the latent loop itself (coconut.py)
"""

from . import blas as _blas, malloc as _malloc

_blas.setup()  # on Linux, a fast BLAS for MLX: must run before anything imports mlx.core (blas.py)
_malloc.setup()  # on Linux, freed arrays' memory reused instead of unmapped (malloc.py)

__version__ = "0.1.0"

_LAZY = {
    "load": "api", "generate_answers": "api", "describe_thoughts": "api", "batch_loss": "api",
    "prompt_ids": "api", "Answer": "api",
    "loss_fn": "coconut", "generate": "coconut", "continuous_forward": "coconut",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mlx_coconut' has no attribute '{name}'")
