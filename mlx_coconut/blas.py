"""A fast BLAS on Linux without asking: the Linux MLX wheel links the reference BLAS, so fp32 matmuls
(the only ones MLX's CPU backend sends to BLAS) run far faster with OpenBLAS preloaded. The console
entry point re-executes itself once with `LD_PRELOAD` set when OpenBLAS is installed."""

import os
import sys
from typing import Optional

CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
              "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")
OPT_OUT = "MLX_COCONUT_NO_REEXEC"  # set to 1 to keep the environment as it is


def find_openblas() -> Optional[str]:
    return next((p for p in CANDIDATES if os.path.exists(p)), None)


def preloaded(environ=os.environ) -> bool:
    return "openblas" in environ.get("LD_PRELOAD", "").lower()


def reexec_env(environ=os.environ, platform: str = sys.platform) -> Optional[dict]:
    """The environment to re-execute with, or None when nothing is to be done."""
    if platform != "linux" or preloaded(environ) or environ.get(OPT_OUT):
        return None
    lib = find_openblas()
    if lib is None:
        return None
    old = environ.get("LD_PRELOAD")
    return {**environ, "LD_PRELOAD": f"{lib}:{old}" if old else lib, OPT_OUT: "1"}


def ensure_fast_blas():
    """Re-execute this command (`python -m mlx_coconut.cli ARGS`) with OpenBLAS preloaded, once."""
    env = reexec_env()
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "mlx_coconut.cli", *sys.argv[1:]], env)


def warning() -> str:
    """A warning on Linux when OpenBLAS is not preloaded (it cannot be when it is not installed)."""
    if sys.platform != "linux" or preloaded():
        return ""
    lib = find_openblas()
    fix = (f"run with LD_PRELOAD={lib}" if lib else
           "apt-get install libopenblas0-pthread (mlx-coconut then preloads it by itself)")
    return ("warning: OpenBLAS is not preloaded: the Linux MLX wheel's reference BLAS makes fp32 "
            f"matmuls ~30x slower and this will take far longer than planned. Fix: {fix}")
