"""Data-parallel training (issue 8): two ranks on 127.0.0.1 over MLX's ring backend.

Two processes with global batch B must train the same parameters as one process with batch B (the
gradient of each rank's share is weighted by its share of the supervised tokens), a 2-rank checkpoint
must resume in one process, and a peer that dies, hangs or never starts must end the job with one line
within a bounded time. Every subprocess runs in its own session with a timeout, and is killed (the
whole process group) if it overruns, so a broken ring cannot hang the suite."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_coconut import checkpoint as ckpt
from mlx_coconut import distributed, training as train
from mlx_coconut.data import make_batch
from mlx_coconut.data import FormatConfig
from tolerance import RTOL, rel_diff, tree_rel_diff

CLI = [sys.executable, "-c", "from mlx_coconut.cli import main; main()", "train"]
LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
TIMEOUT = 90  # seconds, per subprocess: a hang fails the test instead of blocking CI
# global batch 7 over 16 records: shares of 3 + 4 rows, then a last batch of 2 (1 + 1 rows)
SETTINGS = dict(eval_samples=4, max_new_tokens=8, batch_size=7, learning_rate=1e-4, save_every=0,
                seed=0, epochs=1)


def config_file(tiny, name, **kw) -> Path:
    path = tiny["root"] / f"{name}.yaml"
    values = {"model": str(tiny["model"]), "train": str(tiny["data"]), **SETTINGS, **kw}
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


def free_ports(n=2) -> int:
    """A base port p with p .. p+n-1 free on 127.0.0.1 (what `mlx.launch -p` and our hostfiles use),
    below Linux's ephemeral range (32768+) so that no outgoing connection — e.g. one rank dialling
    another — can take it between this check and the rank binding it."""
    rng = random.Random()
    for _ in range(100):
        base = rng.randrange(20000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def bounded(cmd, timeout=TIMEOUT, env=None) -> subprocess.CompletedProcess:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, **(env or {})},
                         stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(cmd[-6:])} did not finish in {timeout} s\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def launch(args, n=2) -> subprocess.CompletedProcess:
    """The documented form: mlx.launch -n 2 -p PORT -- mlx-coconut train ..."""
    r = bounded(LAUNCH + ["-n", str(n), "-p", str(free_ports(n)), "--"] + CLI + args)
    return r


def ranks(tmp, configs, env=None, size=None):
    """Start ranks 0 .. len(configs)-1 of a `size`-rank job by hand, with the variables the ring
    backend reads (MLX_RANK, MLX_HOSTFILE = a JSON file [[ip:port] per rank]) → list of Popen."""
    size = size or len(configs)
    port = free_ports(size)
    hostfile = tmp / f"hosts-{port}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(size)]))
    procs = []
    for r, args in enumerate(configs):
        e = {**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile), **(env or {})}
        procs.append(subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=e, start_new_session=True,
                                      stdin=subprocess.DEVNULL))
    return procs


def finish(p, timeout=TIMEOUT):
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"rank did not finish in {timeout} s\n{out}\n{err}")


def weights(run) -> dict:
    return mx.load(str(ckpt.checkpoint_dir(run) / "model.safetensors"))


# Weights after a few AdamW steps: the update divides each gradient by its running RMS, which
# amplifies the rounding differences of near-zero gradients (two ranks sum in another order), so
# trained weights are compared at 1e-4 of their magnitude; the gradients themselves are checked at
# RTOL in test_shard_gradients_sum_to_the_batch_gradient.
TRAINED_RTOL = 1e-4


def max_diff(a: dict, b: dict) -> float:
    return tree_rel_diff(a, b)


def metrics(run) -> list:
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny):
    """One process, global batch 7, one epoch (3 steps) + validation."""
    out = tiny["root"] / "ref"
    train.run(train.TrainConfig(model=str(tiny["model"]), train=str(tiny["data"]), out=str(out),
                                **SETTINGS), log=lambda *_: None)
    return out


def test_shard_gradients_sum_to_the_batch_gradient(tiny):
    """In one process: Σ_r (n_r / n) · grad(share r) == grad(whole batch), for uneven shares."""
    cfg, _ = train.resolve(train.TrainConfig(model=str(tiny["model"]), train=str(tiny["data"]),
                                             out=str(tiny["root"] / "unused"), batch_size=7,
                                             eval_samples=0))
    records, _ = train.load_data(cfg, lambda *_: None)
    model, tok, special, _ = train.setup_model(cfg, None, lambda *_: None)
    batch = train.epoch_batches(records, tok, FormatConfig.from_settings(cfg, uniform_prob=cfg.uniform_prob), special, cfg, 0)[0]
    stepper = train.Stepper(model, True, False)
    loss, _, full = stepper(make_batch(batch, special.eos, special.latent, cfg.bucket))
    dist = distributed.Dist()
    dist.size = 3  # shares of 2, 2, 3 rows
    total_loss, total = 0.0, None
    for dist.rank in range(3):
        l, g, _ = train.shard_step(stepper, model, batch, special, cfg, dist)
        total_loss += l.item()
        total = g if total is None else tree_map(mx.add, total, g)
    assert rel_diff(total_loss, loss) < RTOL
    assert tree_rel_diff(dict(tree_flatten(full)), dict(tree_flatten(total))) < RTOL


def test_two_ranks_equal_one_process(tiny, reference):
    out = tiny["root"] / "two"
    r = launch(["-c", str(config_file(tiny, "two")), "--out", str(out)])
    assert r.returncode == 0 and "exited with code" not in r.stderr, r.stderr[-3000:]
    assert "data parallel: 2 ranks, global batch 7" in r.stdout
    assert max_diff(weights(out), weights(reference)) < TRAINED_RTOL
    m2, m1 = metrics(out), metrics(reference)
    assert [m["step"] for m in m2] == [1, 2, 3]  # rank 0 alone writes metrics
    assert all(m["ranks"] == 2 for m in m2)
    assert [m["tokens"] for m in m2] == [m["tokens"] for m in m1]
    for a, b in zip(m2, m1):
        assert rel_diff(a["loss"], b["loss"]) < RTOL
    e2, e1 = (json.loads((p / "eval.json").read_text())[-1] for p in (out, reference))
    assert e2["n"] == e1["n"] == 4  # sharded generation, results gathered
    assert rel_diff(e2["valid_loss"], e1["valid_loss"]) < RTOL
    assert [s["prediction"] for s in e2["samples"]] == [s["prediction"] for s in e1["samples"]]


def test_two_rank_checkpoint_resumes_in_one_process(tiny, reference):
    out = tiny["root"] / "two-stop"
    r = launch(["-c", str(config_file(tiny, "stop", stop_after_steps=2)), "--out", str(out)])
    # interrupted: saved at step 2 of 3; ranks exit with 130 (mlx.launch then SIGTERMs whoever is
    # still running — after the checkpoint is committed — and itself exits 0)
    assert "interrupted: saved" in r.stdout and "exited with code 130" in r.stderr, r.stderr[-3000:]
    assert json.loads((ckpt.checkpoint_dir(out) / "state.json").read_text())["step"] == 2
    result = train.run(train.TrainConfig(out=str(out), resume=True), log=lambda *_: None)
    assert result["steps"] == 3 and not result["interrupted"]
    assert max_diff(weights(out), weights(reference)) < TRAINED_RTOL
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def wait_for_first_step(out: Path, procs):
    deadline = time.monotonic() + TIMEOUT
    while not (out / "metrics.jsonl").exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("the 2-rank run did not reach its first step: "
                        + " | ".join(p.communicate()[1][-1500:] for p in procs))
        time.sleep(0.1)


def test_dead_peer_ends_the_job_with_one_line(tiny):
    """Rank 1 is SIGKILLed mid-run (a crash): rank 0 fails at its next collective with one line,
    exit code 2, and the last checkpoint it committed stays loadable."""
    out = tiny["root"] / "dead"
    args = ["-c", str(config_file(tiny, "d", epochs=50)), "--out", str(out), "--save-every", "1"]
    p0, p1 = ranks(tiny["root"], [args, args])
    wait_for_first_step(out, [p0, p1])
    os.killpg(p1.pid, signal.SIGKILL)
    p1.communicate()
    t = time.monotonic()
    _, err = finish(p0, timeout=60)
    assert time.monotonic() - t < 30
    assert p0.returncode == 2, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: rank 0/2: lost the connection to another rank during ")
    assert "the last checkpoint is" in lines[0]
    assert ckpt.load(out).state["step"] >= 1


def test_hung_peer_is_stopped_by_the_watchdog(tiny):
    """Rank 1 freezes (SIGSTOP: no socket is closed, the ring would wait forever): rank 0's watchdog
    prints one line and ends it after MLX_COCONUT_TIMEOUT seconds."""
    out = tiny["root"] / "hung"
    args = ["-c", str(config_file(tiny, "h", epochs=50)), "--out", str(out)]
    p0, p1 = ranks(tiny["root"], [args, args], env={"MLX_COCONUT_TIMEOUT": "5"})
    try:
        wait_for_first_step(out, [p0, p1])
        os.killpg(p1.pid, signal.SIGSTOP)  # rank 1 and its own watchdog: a frozen host
        t = time.monotonic()
        _, err = finish(p0, timeout=30)
        assert time.monotonic() - t < 20
        assert p0.returncode == -signal.SIGKILL
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1, err[-3000:]  # during a step's all_sum or the epoch-end validation
        assert lines[0].startswith("error: rank 0/2: no answer from the other ranks for 5 s during ")
    finally:
        os.killpg(p1.pid, signal.SIGKILL)
        p1.communicate()


def test_missing_peer_ends_start_up_with_one_line(tiny):
    """Only rank 0 of 2 starts: `mx.distributed.init` would retry forever; the watchdog ends it."""
    (p0,) = ranks(tiny["root"], [["-c", str(config_file(tiny, "m")), "--out",
                                  str(tiny["root"] / "missing")]],
                  env={"MLX_COCONUT_CONNECT_TIMEOUT": "2"}, size=2)
    _, err = finish(p0, timeout=30)
    assert "error: rank 0: could not connect to the other ranks within 2 s" in err
    assert p0.returncode == -signal.SIGKILL
