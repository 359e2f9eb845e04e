"""A fast BLAS on Linux without asking: the Linux MLX wheel links the reference BLAS, so fp32 matmuls
(the only ones MLX's CPU backend sends to BLAS) run far faster with an optimised `cblas_sgemm`
preloaded. The console entry point re-executes itself once with `LD_PRELOAD` set to the first library
of `candidates()` found, in the order of their measured training-step speed (docs/performance.md):
the system's OpenBLAS, else Intel MKL from the `mkl` wheel (`pip install 'mlx-coconut[mkl]'`: no apt
needed), else BLIS. An `LD_PRELOAD` already naming one of them wins."""

import glob
import os
import sys
from pathlib import Path
from typing import Optional

OPENBLAS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
            "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")
BLIS = ("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4", "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4")
CANDIDATES = OPENBLAS  # kept for callers of the OpenBLAS-only version
OPT_OUT = "MLX_COCONUT_NO_REEXEC"  # set to 1 to keep the environment as it is
MARKERS = ("openblas", "mkl_rt", "blis")  # a preload naming one of these is already fast


def find_openblas() -> Optional[str]:
    return next((p for p in OPENBLAS if os.path.exists(p)), None)


def find_mkl(prefixes=None) -> Optional[str]:
    """libmkl_rt from the `mkl` wheel (installed into the environment's lib/, or the user base's with
    `pip install --user`), newest soname first."""
    import site
    prefixes = prefixes or dict.fromkeys([sys.prefix, sys.base_prefix, site.getuserbase()])
    for prefix in prefixes:
        found = sorted(glob.glob(str(Path(prefix) / "lib" / "libmkl_rt.so.*")), reverse=True)
        if found:
            return found[0]
    return None


def find_blis() -> Optional[str]:
    return next((p for p in BLIS if os.path.exists(p)), None)


def candidates() -> dict:
    """{name: path} of the fast libraries installed, fastest first."""
    found = {"openblas": find_openblas(), "mkl": find_mkl(), "blis": find_blis()}
    return {k: v for k, v in found.items() if v}


def preloaded(environ=os.environ) -> bool:
    preload = environ.get("LD_PRELOAD", "").lower()
    return any(m in preload for m in MARKERS)


def reexec_env(environ=os.environ, platform: str = sys.platform) -> Optional[dict]:
    """The environment to re-execute with, or None when nothing is to be done."""
    if platform != "linux" or preloaded(environ) or environ.get(OPT_OUT):
        return None
    found = candidates()
    if not found:
        return None
    name, lib = next(iter(found.items()))
    old = environ.get("LD_PRELOAD")
    env = {**environ, "LD_PRELOAD": f"{lib}:{old}" if old else lib, OPT_OUT: "1"}
    if name == "blis":  # BLIS runs on one thread unless told otherwise
        env.setdefault("BLIS_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def ensure_fast_blas():
    """Re-execute this command (`python -m mlx_coconut.cli ARGS`) with a fast BLAS preloaded, once."""
    env = reexec_env()
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "mlx_coconut.cli", *sys.argv[1:]], env)


def warning() -> str:
    """A warning on Linux when no fast BLAS is preloaded (it cannot be when none is installed)."""
    if sys.platform != "linux" or preloaded():
        return ""
    found = candidates()
    fix = (f"run with LD_PRELOAD={next(iter(found.values()))}" if found else
           "pip install 'mlx-coconut[mkl]' or apt-get install libopenblas0-pthread (mlx-coconut "
           "then preloads it by itself)")
    return ("warning: no fast BLAS (OpenBLAS, MKL) is preloaded: the Linux MLX wheel's reference BLAS "
            f"makes fp32 matmuls ~30x slower and this will take far longer than planned. Fix: {fix}")
