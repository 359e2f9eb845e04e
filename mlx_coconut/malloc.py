"""Keep freed memory in the process on Linux: MLX's CPU backend has no buffer cache of its own.

Without Metal, MLX allocates every array with plain `malloc` and frees it when the array dies. glibc
serves blocks above its mmap threshold (128 KB, growing to at most 32 MB) with a fresh `mmap` and
unmaps them on `free`, so every training step asks the kernel for hundreds of MB of new zeroed pages
(SmolLM2's tied embedding alone is 113 MB, and so are its gradient and both AdamW moments): page
faults and page zeroing, about a sixth of a step (docs/performance.md). `setup()` tells glibc never
to serve a block by `mmap` and never to give the top of the heap back, so a freed block waits on
glibc's free lists for the next step's array of the same size.

`import mlx_coconut` calls `setup()`. It does nothing off Linux (macOS's allocator and MLX's Metal
buffer cache already recycle), without glibc's `mallopt` (musl), when any `MALLOC_*_` tunable is
set in the environment (the user chose), or with `MLX_COCONUT_MALLOC=system`.
"""

import ctypes
import os
import sys

CHOICE = "MLX_COCONUT_MALLOC"  # "keep" (the default) or "system" (leave glibc's defaults)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h> parameter numbers
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the largest free heap top glibc keeps (2 GB)
USER_TUNABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES")

STATE = {"kept": False, "why": "not set up"}


def setup(environ=os.environ, platform: str = sys.platform) -> dict:
    """Keep freed blocks in the process (see the module docstring); returns and records what it did."""
    if _choice(environ) not in ("keep", "system"):
        print(f"warning: {CHOICE}={environ[CHOICE]}: expected keep or system; using keep", file=sys.stderr)
    why = _skip_reason(environ, platform) or _mallopt()
    STATE.update(kept=not why, why=why)
    return STATE


def _choice(environ) -> str:
    return environ.get(CHOICE, "").strip().lower() or "keep"


def _skip_reason(environ, platform: str) -> str:
    if not platform.startswith("linux"):
        return f"not Linux ({platform})"
    if _choice(environ) == "system":
        return f"{CHOICE}=system"
    chosen = [name for name in USER_TUNABLES if name in environ]
    return f"{chosen[0]} is set" if chosen else ""


def _mallopt() -> str:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "no mallopt (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return "mallopt refused"
    return ""


def describe(state=STATE) -> str:
    return ("freed memory kept for reuse (mallopt: no mmap, no trim)" if state["kept"]
            else f"system malloc defaults ({state['why']})")
