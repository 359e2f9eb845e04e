"""Files written safely: atomic JSON and directories, append-only JSON lines, the disk-space check
around a write, the run directory's lock and the clean-up of what a killed process left behind.
No mlx, no model: what checkpoint.py, training/ and convert/ write goes through here."""

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from .errors import MLX_WRITE_ERROR, UserError


def read_json(file: Path):
    """A JSON file, invalid JSON reported as one line naming the file and the line."""
    try:
        return json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def free_space(path) -> int:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(target, need: int):
    free = free_space(target)
    if need > free:
        raise UserError(f"{target}: not enough disk space: needs {size_text(need)}, {size_text(free)} "
                        f"free; nothing was written (free some space or choose another location)")


@contextlib.contextmanager
def disk_space_for(target, need: int):
    """Around writing `need` bytes for `target`: one line before anything is written when the disk
    has less free, and one line when it fills up meanwhile — MLX then raises RuntimeError "[write]
    Unable to write N bytes to file.", not an OSError. The caller removes what was partly written."""
    check_free_space(target, need)
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith(MLX_WRITE_ERROR):
            raise
        raise UserError(f"{target}: the disk filled up while writing it (needs {size_text(need)}, "
                        f"{size_text(free_space(target))} free now); nothing was kept (free some space "
                        f"and retry)") from None



def json_safe(data):
    """NaN / inf become null: JSON has no such numbers (Python would write invalid `NaN`)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def write_json_atomic(file, data):
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file
        raise


@contextlib.contextmanager
def atomic_dir(out: Path):
    """A temp directory beside `out` to fill; once the block succeeds it becomes `out` (an existing
    `out` is swapped out, then deleted), and on any failure it is removed: `out` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():  # --force: swap in the new directory, then delete the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(file, record: dict):
    with open(file, "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def truncate_jsonl(file, max_step: int):
    """Keep the lines up to `max_step` (a resumed run rewrites the steps after its checkpoint)."""
    file = Path(file)
    if not file.exists():
        return
    keep = []
    for line in file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except (ValueError, AttributeError):
            break  # a torn last line (killed mid-write): drop it and what follows
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunLock:
    """Exclusive lock on RUN_DIR/.lock (fcntl.flock: Linux and macOS) for one training process. The
    OS releases it when the process exits, even on kill -9, so a stale lock cannot block a rerun."""

    def __init__(self, run_dir):
        self.file = Path(run_dir) / ".lock"
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            os.close(self.fd)
            self.fd = None
            raise UserError(f"--out {self.file.parent}: another training process"
                            f"{f' (pid {holder})' if holder else ''} is using this run directory; "
                            f"wait for it or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory, name: Optional[str] = None) -> list:
    """Delete `.<name>.tmp-PID` / `.<name>.old-PID` entries (any name if None) left behind by dead
    processes (kill -9, power loss)."""
    removed = []
    pattern = re.compile(r"\." + (re.escape(name) if name else r".+") + r"\.(tmp|old)-(\d+)")
    for p in Path(directory).glob(f".{name or ''}*"):
        m = pattern.fullmatch(p.name)
        if m and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed

