"""Data parallelism with MLX's own `mx.distributed` (ring backend, launched by `mlx.launch`).

`mlx.launch -n 2 -- mlx-coconut train ...` (or `--hostfile hosts.json` across Macs) starts one process
per rank with `MLX_RANK` and `MLX_HOSTFILE` set; `setup()` sees them and joins the ring. Without them
training is the plain single-process loop and nothing here touches `mx.distributed`.

Every rank builds the same global batches (the data order is a function of (seed, epoch)) and takes a
contiguous share of each (`split`). Rank r computes the mean loss over its n_r supervised tokens;
`loss_fn` of one process over the whole batch is the mean over n = Σ n_r tokens, so each rank scales its
gradient by n_r / n (all n_r are known on every rank from the host-side labels) and the `all_sum` of
the scaled gradients is exactly the one-process gradient — a plain average would weight a short shard
like a long one.

Failure handling. What the ring backend does (mlx 0.32): a peer that exits closes its
sockets and the next collective on the others raises `RuntimeError: [ring] connection to a peer was
lost` at once; a peer that hangs (or a cable that is pulled without a FIN) blocks the others in the
collective forever; a peer that never starts blocks `mx.distributed.init` forever (it retries the
connection with back-off, holding the GIL). So: the error is turned into one line naming the rank and
the step, and a watchdog *subprocess* (it must not need our GIL) kills a rank that has waited longer
than the timeout in `init` or a collective, after printing one line. Only rank 0 writes checkpoints,
and a checkpoint is committed atomically, so the last one stays loadable.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{name}={text!r}: expected a number of seconds > 0")
    return value


CONNECT_TIMEOUT = _env_seconds("MLX_COCONUT_CONNECT_TIMEOUT", 120)  # seconds, init
TIMEOUT = _env_seconds("MLX_COCONUT_TIMEOUT", 600)  # seconds a rank may wait in a collective
BUCKET_BYTES = 32 * 1024 ** 2  # concatenate small gradients into all_sum calls of up to this size

_WATCHER = r"""
import os, select, signal, sys
parent, deadline, msg = int(sys.argv[1]), None, ""
import time
buf = b""
while True:
    wait = None if deadline is None else max(deadline - time.monotonic(), 0)
    r, _, _ = select.select([0], [], [], wait)
    if not r:
        sys.stderr.write(msg + "\n"); sys.stderr.flush()
        try: os.kill(parent, signal.SIGKILL)
        except OSError: pass
        os._exit(0)
    data = os.read(0, 4096)
    if not data:
        os._exit(0)   # the parent exited
    buf += data
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        cmd, _, rest = line.decode().partition(" ")
        if cmd == "arm":
            secs, _, msg = rest.partition(" ")
            deadline = time.monotonic() + float(secs)
        else:
            deadline = None
"""


class Watchdog:
    """A tiny helper process that SIGKILLs us (after one line on stderr) if we stay armed too long.
    A process, not a thread: `mx.distributed.init` blocks while holding the GIL."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)

    def arm(self, seconds: float, message: str):
        self._send(f"arm {seconds} {message.replace(chr(10), ' ')}")

    def disarm(self):
        self._send("off")

    def _send(self, line: str):
        try:
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass


class Dist:
    """This process's place in the job: rank, size and the collectives training needs."""

    def __init__(self, group=None, watchdog: Optional[Watchdog] = None, timeout: float = TIMEOUT):
        self.group, self.watchdog, self.timeout = group, watchdog, timeout
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.checkpoint = None  # the last checkpoint, for failure messages
        self.wait_s = 0.0  # time the last collective took (transfer + waiting for the slowest rank)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def split(self, items: list) -> list:
        """Contiguous shares, sizes differing by at most one (some are empty when len < size)."""
        n, k = len(items), self.size
        bounds = [i * n // k for i in range(k + 1)]
        return [items[bounds[i]:bounds[i + 1]] for i in range(k)]

    def shard(self, items: list) -> list:
        return self.split(items)[self.rank]

    # ------------------------------------------------------------ collectives (bounded in time)

    def _run(self, what: str, fn, timeout: Optional[float] = None):
        where = f"; the last checkpoint is {self.checkpoint}" if self.checkpoint else ""
        timeout = timeout or self.timeout
        if self.watchdog:
            self.watchdog.arm(timeout, f"error: rank {self.rank}/{self.size}: no answer from the "
                              f"other ranks for {timeout:.0f} s during {what} (a peer hung or the "
                              f"link is down); stopping{where}")
        t = time.perf_counter()
        try:
            return fn()
        except RuntimeError as e:
            raise UserError(f"rank {self.rank}/{self.size}: lost the connection to another rank "
                            f"during {what} ({e}); stopping{where}") from None
        finally:
            self.wait_s = time.perf_counter() - t
            if self.watchdog:
                self.watchdog.disarm()

    def all_sum(self, tree, what: str = "all_sum"):
        """Sum a tree of arrays over the ranks: leaves grouped by dtype into ≤ 32 MB buckets, one
        all_sum per bucket (as `mlx.nn.average_gradients`, without its division by N)."""
        flat = tree_flatten(tree)
        if not self.enabled or not flat:
            return tree
        out = [None] * len(flat)
        buckets = {}
        for i, (_, v) in enumerate(flat):
            group = buckets.setdefault(v.dtype, [[]])
            if group[-1] and sum(flat[j][1].nbytes for j in group[-1]) + v.nbytes > BUCKET_BYTES:
                group.append([])
            group[-1].append(i)
        sums = []
        for groups in buckets.values():
            for idx in groups:
                big = mx.concatenate([flat[i][1].reshape(-1) for i in idx])
                sums.append((idx, mx.distributed.all_sum(big, group=self.group)))

        def reduce():
            mx.eval([s for _, s in sums])
            return sums

        for idx, s in self._run(what, reduce):
            offsets = np.cumsum([flat[i][1].size for i in idx])[:-1].tolist()
            for i, part in zip(idx, mx.split(s, offsets) if offsets else [s]):
                out[i] = part.reshape(flat[i][1].shape)
        return tree_unflatten([(k, v) for (k, _), v in zip(flat, out)])

    def barrier(self, what: str = "a barrier"):
        if self.enabled:
            self._run(what, lambda: mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.group)))

    def gather_json(self, obj, what: str = "gather", timeout: Optional[float] = None) -> list:
        """Every rank's JSON-serialisable `obj`, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)

        def gather():
            sizes = mx.distributed.all_gather(mx.array([data.size], dtype=mx.int32), group=self.group)
            mx.eval(sizes)
            sizes = sizes.tolist()
            buf = np.zeros(max(sizes), dtype=np.uint8)
            buf[:data.size] = data
            allb = mx.distributed.all_gather(mx.array(buf), group=self.group)
            mx.eval(allb)
            return sizes, np.array(allb).reshape(self.size, -1)

        sizes, rows = self._run(what, gather, timeout)
        return [json.loads(rows[r, :sizes[r]].tobytes().decode()) for r in range(self.size)]

    def check_same(self, values: dict, what: str = "start-up check"):
        """Fail on every rank, naming the difference, if the ranks disagree (e.g. a stale run dir)."""
        mine = dict(values)
        # ranks finish loading at different times: the start-up allowance, not the per-step one
        everyone = self.gather_json(mine, what, max(CONNECT_TIMEOUT, self.timeout))
        for r, theirs in enumerate(everyone):
            diff = [k for k in mine if theirs.get(k) != everyone[0].get(k)]
            if diff:
                raise UserError("ranks disagree: " + ", ".join(
                    f"{k} is {everyone[0].get(k)} on rank 0 but {theirs.get(k)} on rank {r}"
                    for k in diff) + " (every host needs the same model, data and run directory)")


_DIST: Optional[Dist] = None


def launched() -> bool:
    """Started by `mlx.launch` with more than one rank (or with its variables set by hand)?
    (`mlx.launch -n 1` sets MLX_HOSTFILE to an empty file: a single process.)"""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return False
    try:
        return bool(open(path).read().strip())
    except OSError as e:
        raise UserError(f"MLX_HOSTFILE={path}: cannot read the hostfile ({e.strerror})") from None


def setup() -> Dist:
    """Join the ring once per process (a curriculum reuses it); a single process without the
    launcher's variables gets size 1 and no distributed calls at all."""
    global _DIST
    if _DIST is not None:
        return _DIST
    if not launched():
        _DIST = Dist()
        return _DIST
    rank = os.environ.get("MLX_RANK", "?")
    watchdog = Watchdog()
    watchdog.arm(CONNECT_TIMEOUT, f"error: rank {rank}: could not connect to the other ranks within "
                 f"{CONNECT_TIMEOUT:.0f} s (is every host up and running the job? check the IPs/ports "
                 f"in the hostfile and the firewall); stopping")
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as e:
        raise UserError(f"rank {rank}: could not join the ring ({e})") from None
    finally:
        watchdog.disarm()
    _DIST = Dist(group, watchdog)
    signal.signal(signal.SIGTERM, _terminated)
    return _DIST


def _terminated(*_):
    """`mlx.launch` SIGTERMs the surviving ranks as soon as one rank exits with an error: say so in
    one line (Python runs this between operations, i.e. once the current step or collective ends)."""
    d = _DIST
    where = f"; the last checkpoint is {d.checkpoint}" if d and d.checkpoint else ""
    sys.stderr.write(f"error: rank {d.rank}/{d.size}: stopped by the launcher (another rank exited or "
                     f"failed){where}\n")
    sys.stderr.flush()
    os._exit(128 + signal.SIGTERM)
