"""User-facing errors: the CLI prints them as one line and exits 2.

`UserError` is raised on purpose with a message naming the file / line / flag. `describe` recognises
the other failures a user can cause without any bug in mlx-coconut (a full or read-only disk, a
truncated or corrupt file) and phrases them as one line too; anything else is a bug and keeps its
traceback.
"""

import errno
import json
import os
import struct
from typing import Optional


class UserError(Exception):
    """Bad input from the user (a file, a line, a flag). Message must name what is wrong and where."""


# mlx reports unreadable weight files as RuntimeError with these prefixes (C++ loaders, nlohmann json)
_MLX_LOAD_ERRORS = ("[load", "[json.exception", "[safetensors", "[gguf")
# ... and a failed write (a full disk) as RuntimeError "[write] Unable to write N bytes to file."
MLX_WRITE_ERROR = "[write]"


def os_error_line(e: OSError) -> str:
    """'<what went wrong>: <file>' for an OSError of any errno, with a hint for the usual fixes."""
    what = e.strerror or (os.strerror(e.errno) if e.errno else None) or str(e) or type(e).__name__
    where = e.filename if e.filename is not None else None
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    hint = {errno.ENOSPC: " (free some disk space and retry)",
            errno.EROFS: " (choose a writable location)",
            errno.EDQUOT: " (disk quota exceeded: free some space)"}.get(e.errno, "")
    return f"{what}: {where}{hint}" if where else f"{what}{hint}"


def describe(e: BaseException) -> Optional[str]:
    """One line for an expected failure, None for an unexpected one (a bug: show the traceback)."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_line(e)
    if isinstance(e, MemoryError):
        return "out of memory (try a smaller --batch-size, --lora, or -q 4)"
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON at line {e.lineno}: {e.msg}"
    if isinstance(e, (UnicodeDecodeError, struct.error, EOFError)):
        return f"a file is truncated or corrupt ({type(e).__name__}: {e})"
    if isinstance(e, (RuntimeError, ValueError)) and str(e).startswith(_MLX_LOAD_ERRORS):
        return f"cannot read a weights file: {str(e).splitlines()[0]}"
    if isinstance(e, RuntimeError) and str(e).startswith(MLX_WRITE_ERROR):
        return f"cannot write a weights file: {str(e).splitlines()[0]} (is the disk full?)"
    return None
