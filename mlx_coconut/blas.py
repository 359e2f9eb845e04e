"""A fast BLAS for MLX on Linux, loaded in-process by `import mlx_coconut`.

The Linux MLX wheel (`mlx[cpu]`) links a reference BLAS, and fp32 matmuls, the only ones its CPU
backend sends to BLAS (`cblas_sgemm`), run ~60x slower with it than with OpenBLAS
(docs/performance.md). A library opened with RTLD_GLOBAL before libmlx is loaded comes first in
symbol lookup (the global scope is searched before libmlx's own dependencies), so
`mlx_coconut/__init__.py` calls `setup()` before anything imports mlx.core: the command line, the
Python API, pytest and the scripts all get it, with no re-exec and no LD_PRELOAD.

Which library: `MLX_COCONUT_BLAS` if set (a name from `candidates()`, a library path, or `reference`
for MLX's own); else one already in the global scope (`LD_PRELOAD`); else the first of `candidates()`
that loads, in the order of the measurements in docs/performance.md: the system's OpenBLAS, the
OpenBLAS wheel `ngsolve-openblas` (a dependency on x86-64 Linux), MKL from the `mkl` wheel, BLIS.
"""

import ctypes
import glob
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

OPENBLAS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
            "/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")
BLIS = ("/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4", "/usr/lib/aarch64-linux-gnu/blis-pthread/libblis.so.4")
CHOICE = "MLX_COCONUT_BLAS"  # a name from candidates(), a library path, or "reference"
PYPI_OPENBLAS = "ngsolve-openblas"

# What setup() did: {"name", "path"} of the library MLX uses (name "reference": its own), or a warning
STATE = {"name": None, "path": None, "warning": ""}


def find_openblas() -> Optional[str]:
    return next((p for p in OPENBLAS if os.path.exists(p)), None)


def find_pypi_openblas() -> Optional[str]:
    """OpenBLAS from the `ngsolve-openblas` wheel, found without importing its module (whose import
    prints an error where libgfortran.so.5 is missing, see `_load_with_mlx_libgfortran`)."""
    spec = importlib.util.find_spec("ngsolve_openblas")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "libopenblas*.so*")))
    return found[-1] if found else None


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
    found = {"openblas": find_openblas(), "openblas-pypi": find_pypi_openblas(), "mkl": find_mkl(),
             "blis": find_blis()}
    return {k: v for k, v in found.items() if v}


# ---------------------------------------------------------------- loading

class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def global_sgemm() -> Optional[str]:
    """The file whose `cblas_sgemm` is first in the global scope (an LD_PRELOAD, a library opened with
    RTLD_GLOBAL): the one MLX binds to. None: MLX uses its own reference BLAS."""
    scope = ctypes.CDLL(None)
    try:
        addr = ctypes.cast(scope.cblas_sgemm, ctypes.c_void_p)
    except AttributeError:
        return None
    dladdr = getattr(scope, "dladdr", None) or ctypes.CDLL("libdl.so.2").dladdr  # glibc < 2.34: libdl
    info = _DlInfo()
    if dladdr(addr, ctypes.byref(info)) and info.dli_fname:
        return os.fsdecode(info.dli_fname)
    return "?"


def load_global(path: str):
    """Open `path` with RTLD_GLOBAL, so that MLX's `cblas_sgemm` resolves to it."""
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        if "libgfortran.so.5" not in str(e):
            raise
        _load_with_mlx_libgfortran(path)


def _load_with_mlx_libgfortran(path: str):
    """The PyPI OpenBLAS needs `libgfortran.so.5`, which a bare system lacks. The mlx-cpu wheel ships
    one as mlx_cpu.libs/libgfortran-<hash>.so.5.0.0, but under that name (its SONAME), so loading it
    first does not satisfy the dependency, and LD_LIBRARY_PATH is read only at process start. What
    works in-process: a temporary directory of symlinks — the library, `libgfortran.so.5` and its
    neighbours in mlx_cpu.libs — since the loader looks for a dependency in `$ORIGIN` (the OpenBLAS
    wheel's RPATH), which is the directory of the path it was opened by. The links are removed once
    loaded (the mappings stay): nothing is written into site-packages, which may be read-only."""
    libs = _mlx_libs_dir()
    gfortran = sorted(libs.glob("libgfortran*.so.5*")) if libs else []
    if not gfortran:
        raise OSError(f"{path} needs libgfortran.so.5, found neither on the system nor in the mlx-cpu wheel")
    tmp = Path(tempfile.mkdtemp(prefix="mlx-coconut-blas-"))
    try:
        for lib in libs.glob("lib*.so*"):
            (tmp / lib.name).symlink_to(lib)
        (tmp / "libgfortran.so.5").symlink_to(gfortran[0])
        (tmp / "libblas-fast.so").symlink_to(os.path.realpath(path))
        ctypes.CDLL(str(tmp / "libblas-fast.so"), mode=ctypes.RTLD_GLOBAL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mlx_libs_dir() -> Optional[Path]:
    """mlx_cpu.libs beside the mlx package (libmlx's RPATH is $ORIGIN/../../mlx_cpu.libs). `mlx` is
    a namespace package: any directory named mlx on sys.path (the current one) is among its paths."""
    spec = importlib.util.find_spec("mlx")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location).parent / "mlx_cpu.libs"
        if path.is_dir():
            return path
    return None


def choose(environ=os.environ) -> tuple:
    """→ (name, path) to load: MLX_COCONUT_BLAS's choice, else the first candidate; (None, None)."""
    choice = environ.get(CHOICE, "").strip()
    found = candidates()
    if not choice:
        return next(iter(found.items()), (None, None))
    if choice == "reference":
        return "reference", None
    if choice in found:
        return choice, found[choice]
    if os.path.exists(choice):
        return os.path.basename(choice), choice
    raise ValueError(f"{CHOICE}={choice}: neither a library path nor one of: reference, "
                     f"{', '.join(found) or '(no fast BLAS is installed)'}")


def load(environ=os.environ, imported: bool = None) -> dict:
    """Make MLX use a fast BLAS if it can still be done → {"name", "path", "warning"}."""
    current = global_sgemm()
    if current:  # first in the global scope: MLX binds to it whatever is loaded after
        return {"name": "preloaded", "path": current, "warning": ""}
    try:
        name, path = choose(environ)
    except ValueError as e:
        return {"name": "reference", "path": None, "warning": f"warning: {e}; MLX uses its reference BLAS"}
    if name == "reference":
        return {"name": "reference", "path": None, "warning": ""}
    if "mlx.core" in sys.modules if imported is None else imported:
        return {"name": "reference", "path": None, "warning": "warning: mlx.core was imported before "
                "mlx_coconut, so MLX keeps its slow reference BLAS (fp32 matmuls ~60x slower); import "
                "mlx_coconut first"}
    if path is None:
        return {"name": "reference", "path": None, "warning": no_fast_blas()}
    if name == "blis":  # BLIS runs on one thread unless told otherwise
        os.environ.setdefault("BLIS_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        load_global(path)
    except OSError as e:
        return {"name": "reference", "path": None,
                "warning": f"warning: could not load {path} ({e}); MLX uses its slow reference BLAS"}
    return {"name": name, "path": path, "warning": ""}


def no_fast_blas() -> str:
    """The one line for a Linux machine where no fast BLAS is installed, with the fix."""
    fix = ("pip install ngsolve-openblas (a dependency of mlx-coconut on x86-64 Linux)"
           if platform.machine() == "x86_64" else
           "install OpenBLAS (apt-get install libopenblas0-pthread, dnf install openblas), or set "
           f"{CHOICE} to the path of a BLAS library")
    return (f"warning: no fast BLAS found for MLX on Linux {platform.machine()}: fp32 matmuls run on "
            f"the wheel's reference BLAS, ~60x slower. Fix: {fix}")


def setup():
    """Once per process, on Linux: load the fast BLAS; print one line when it cannot be done."""
    if sys.platform != "linux" or STATE["name"] is not None:
        return
    STATE.update(load())
    if STATE["warning"]:
        print(STATE["warning"], file=sys.stderr)


# ---------------------------------------------------------------- what is in use

def matmul_gflops(n: int = 1024, seconds: float = 0.5, clock=time.perf_counter) -> float:
    """GFLOP/s of an fp32 n x n x n matmul on the CPU: the best of the repeats within `seconds` (at
    least two), so that a busy machine lowers it less. `clock=time.process_time` counts the process's
    CPU time instead: with one BLAS thread, a rate of the library that other load hardly changes."""
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0), stream=mx.cpu)
    mx.eval(mx.matmul(a, a, stream=mx.cpu))
    best, start = float("inf"), time.perf_counter()
    for i in range(1000):
        t = clock()
        mx.eval(mx.matmul(a, a, stream=mx.cpu))
        best = min(best, clock() - t)
        if i >= 1 and time.perf_counter() - start > seconds:
            break
    return 2 * n ** 3 / max(best, 1e-9) / 1e9


def describe(state=STATE) -> str:
    """Which BLAS MLX uses: name, version (OpenBLAS says it) and file."""
    if state["name"] in (None, "reference"):
        return "the MLX wheel's reference BLAS (slow)"
    config = getattr(ctypes.CDLL(None), "openblas_get_config", None)
    version = ""
    if config is not None:
        config.restype = ctypes.c_char_p
        version = config().decode(errors="replace") + ", "
    return f"{state['name']} ({version}{state['path']})"
