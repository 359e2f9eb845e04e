"""Freed memory kept for reuse on Linux (mlx_coconut/malloc.py): when `import mlx_coconut` sets glibc up,
and that an array allocated again after one was freed costs no fresh pages."""

import json
import os
import subprocess
import sys

import pytest

from mlx_coconut import malloc

# Minor page faults of eight 64 MB MLX arrays, each freed before the next is made (after one warm-up)
PROBE = """
import json, resource
import mlx_coconut, mlx.core as mx
from mlx_coconut import malloc
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = mx.ones((16 * 2**20,)); mx.eval(x); del x
before = faults()
for i in range(8):
    x = mx.ones((16 * 2**20,)) * i; mx.eval(x); del x
print(json.dumps({"faults": faults() - before, **malloc.STATE}))
"""


def _probe(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != malloc.CHOICE}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **extra}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only (macOS's allocator and Metal's cache recycle)")
def test_a_freed_array_is_reused_without_new_pages():
    system = _probe(**{malloc.CHOICE: "system"})
    if system["faults"] < 16 * 2**20 * 4 * 8 / 2**21:  # fewer than one fault per 2 MB page: huge pages
        pytest.skip(f"the system malloc took only {system['faults']} page faults (transparent huge pages)")
    kept = _probe()
    assert (system["kept"], kept["kept"]) == (False, True), (system, kept)
    # each 64 MB array is 16k fresh 4 KB pages with the system defaults; reused, next to none
    assert kept["faults"] < system["faults"] / 10, (kept, system)


@pytest.mark.parametrize("environ, platform, why", [
    ({}, "linux", ""),
    ({}, "darwin", "not Linux (darwin)"),
    ({malloc.CHOICE: "system"}, "linux", f"{malloc.CHOICE}=system"),
    ({"MALLOC_TOP_PAD_": "0"}, "linux", "MALLOC_TOP_PAD_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, "linux", "GLIBC_TUNABLES is set"),
])
def test_when_it_stands_aside(environ, platform, why):
    assert malloc._skip_reason(environ, platform) == why


def test_an_unknown_choice_is_one_warning_line(capsys):
    state = malloc.setup({malloc.CHOICE: "sometimes"}, "darwin")  # darwin: nothing is changed here
    assert state["kept"] is False and state["why"] == "not Linux (darwin)"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {malloc.CHOICE}=sometimes: expected keep or system; using keep"]
    malloc.setup()  # this process's real state back
