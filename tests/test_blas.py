"""The fast BLAS on Linux (mlx_coconut/blas.py): `import mlx_coconut` puts MLX on it, measured against
MLX's reference BLAS on the same machine; the libgfortran links; which library is chosen and the
one-line warnings."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_coconut import blas

linux = pytest.mark.skipif(sys.platform != "linux", reason="Linux only (macOS: Accelerate and Metal)")

# GFLOP per CPU-second with one BLAS thread: a rate of the library, whatever else the machine runs
PROBE = ("import json, time; import mlx_coconut; from mlx_coconut import blas; print(json.dumps({**blas.STATE, "
         "'sgemm': blas.global_sgemm(), 'gflops': blas.matmul_gflops(512, 1.0, time.process_time)}))")
ONE_THREAD = {f"{lib}_NUM_THREADS": "1" for lib in ("OPENBLAS", "MKL", "BLIS", "OMP")}


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.CHOICE)}
    return {**env, **extra}


def _probe(**extra) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=_clean_env(**ONE_THREAD, **extra), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@linux
def test_import_mlx_coconut_puts_mlx_on_a_fast_blas():
    if not blas.candidates() and platform.machine() != "x86_64":
        pytest.skip(f"no fast BLAS installed and no PyPI one for {platform.machine()}")
    fast = _probe()
    reference = _probe(MLX_COCONUT_BLAS="reference")
    assert fast["name"] != "reference" and fast["sgemm"] and not fast["warning"], fast
    assert reference["name"] == "reference" and reference["sgemm"] is None, reference
    # one OpenBLAS thread does ~20x the reference BLAS's GFLOP per CPU-second on this project's CPUs
    assert fast["gflops"] >= 5 * reference["gflops"], (fast, reference)


@linux
def test_console_script_reports_the_blas_and_its_speed():
    exe = shutil.which("mlx-coconut") or str(Path(sys.executable).parent / "mlx-coconut")
    out = subprocess.run([exe, "info"], env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    blas_line = next(line for line in out.stdout.splitlines() if line.startswith("BLAS: "))
    assert "reference" not in blas_line and "GFLOP/s" in out.stdout, out.stdout


@linux
def test_pypi_openblas_loads_with_the_mlx_wheels_libgfortran():
    """The symlink route for a system without libgfortran.so.5, taken here even where one exists."""
    if blas.find_pypi_openblas() is None:
        pytest.skip("ngsolve-openblas is not installed (a dependency on x86-64 Linux only)")
    code = ("from mlx_coconut import blas; blas._load_with_mlx_libgfortran(blas.find_pypi_openblas()); "
            "import mlx.core as mx; a = mx.ones((64, 64)); print(blas.global_sgemm(), (a @ a)[0, 0].item())")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(MLX_COCONUT_BLAS="reference"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sgemm, value = out.stdout.split()
    assert "mlx-coconut-blas-" in sgemm and float(value) == 64.0  # bound to the linked library


def test_candidates_in_measured_order(monkeypatch, tmp_path):
    (tmp_path / "lib").mkdir()
    assert blas.find_mkl([tmp_path]) is None
    for name in ("libmkl_rt.so.2", "libmkl_rt.so.3"):  # the mkl wheel's layout: <prefix>/lib
        (tmp_path / "lib" / name).write_bytes(b"")
    assert blas.find_mkl([tmp_path]) == str(tmp_path / "lib" / "libmkl_rt.so.3")
    for finder in ("find_openblas", "find_pypi_openblas", "find_mkl", "find_blis"):
        monkeypatch.setattr(blas, finder, lambda finder=finder: f"/{finder}.so")
    assert list(blas.candidates()) == ["openblas", "openblas-pypi", "mkl", "blis"]
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    assert blas.choose({}) == ("openblas-pypi", "/find_pypi_openblas.so")  # the fastest one installed


def test_choose_follows_mlx_coconut_blas(monkeypatch, tmp_path):
    found = {"openblas-pypi": "/p/libopenblasp.so", "mkl": "/m/libmkl_rt.so.3"}
    monkeypatch.setattr(blas, "candidates", lambda: dict(found))
    lib = tmp_path / "libmyblas.so"
    lib.write_bytes(b"")
    assert blas.choose({blas.CHOICE: "mkl"}) == ("mkl", found["mkl"])
    assert blas.choose({blas.CHOICE: "reference"}) == ("reference", None)
    assert blas.choose({blas.CHOICE: str(lib)}) == ("libmyblas.so", str(lib))
    with pytest.raises(ValueError, match="reference, openblas-pypi, mkl"):
        blas.choose({blas.CHOICE: "nonesuch"})
    found.clear()
    assert blas.choose({}) == (None, None)


def test_load_says_in_one_line_what_went_wrong(monkeypatch, tmp_path):
    monkeypatch.setattr(blas, "global_sgemm", lambda: "/x/libopenblas.so.0")  # an LD_PRELOAD wins
    assert blas.load({blas.CHOICE: "nonesuch"}) == {"name": "preloaded", "path": "/x/libopenblas.so.0",
                                                    "warning": ""}
    monkeypatch.setattr(blas, "global_sgemm", lambda: None)
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setattr(blas, "candidates", lambda: {"openblas": str(broken)})
    assert "import mlx_coconut first" in blas.load({}, imported=True)["warning"]
    assert blas.load({blas.CHOICE: "reference"}, imported=True)["warning"] == ""  # asked for
    state = blas.load({}, imported=False)
    assert state["name"] == "reference" and state["warning"].startswith(f"warning: could not load {broken}")
    assert "MLX_COCONUT_BLAS=nonesuch" in blas.load({blas.CHOICE: "nonesuch"}, imported=False)["warning"]
    monkeypatch.setattr(blas, "candidates", dict)
    state = blas.load({}, imported=False)
    assert state["name"] == "reference" and state["warning"] == blas.no_fast_blas()
    assert "Fix: " in state["warning"] and "\n" not in state["warning"]


def test_load_gives_blis_every_core(monkeypatch):
    loaded = []
    monkeypatch.setattr(blas, "global_sgemm", lambda: None)
    monkeypatch.setattr(blas, "candidates", lambda: {"blis": "/b/libblis.so.4"})
    monkeypatch.setattr(blas, "load_global", loaded.append)
    monkeypatch.setenv("BLIS_NUM_THREADS", "1")
    monkeypatch.delenv("BLIS_NUM_THREADS")  # restored to unset afterwards
    assert blas.load({}, imported=False) == {"name": "blis", "path": "/b/libblis.so.4", "warning": ""}
    assert loaded == ["/b/libblis.so.4"] and os.environ["BLIS_NUM_THREADS"] == str(os.cpu_count() or 1)


def test_mlx_libs_found_past_a_directory_named_mlx(monkeypatch, tmp_path):
    """`mlx` is a namespace package: a directory named mlx in the current one comes first."""
    from types import SimpleNamespace
    for where in ("cwd/mlx", "site/mlx", "site/mlx_cpu.libs"):
        (tmp_path / where).mkdir(parents=True)
    spec = SimpleNamespace(submodule_search_locations=[str(tmp_path / "cwd/mlx"), str(tmp_path / "site/mlx")])
    monkeypatch.setattr(blas.importlib.util, "find_spec", lambda name: spec)
    assert blas._mlx_libs_dir() == tmp_path / "site/mlx_cpu.libs"
