"""Failure behaviour (docs/failures.md): no run ends with bad weights, a lost result, foreign code
executed, or a traceback. One test (or more) per way a user can hurt a run, on tiny models."""

import errno
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_coconut import checkpoint as ckpt
from mlx_coconut import files, training as train
from mlx_coconut.training import evaluation
from mlx_coconut.cli import main
from mlx_coconut.data import synth_records
from mlx_coconut.errors import UserError
from helpers import cfg, make_tiny_model, quiet

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    """Run the CLI in-process → (exit code, stderr/stdout text)."""
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return res.exit_code, res.output


def one_line_error(code, output, *needles):
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [l for l in output.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def checkpoint_weights(run) -> dict:
    d = ckpt.checkpoint_dir(run)
    return mx.load(str(d / ("adapters.safetensors" if (d / "adapters.safetensors").exists()
                            else "model.safetensors")))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- the CLI's top-level handler


def test_handler_expected_failures_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path):
    from mlx_coconut import data as data_lib

    def raiser(exc):
        def f(*a, **k):
            raise exc
        return f

    src = tmp_path / "in.json"
    src.write_text("[]")
    for exc, needle in [(OSError(errno.ENOSPC, "No space left on device", "o.json"), "No space left"),
                        (OSError(errno.EROFS, "Read-only file system", "o.json"), "Read-only"),
                        (RuntimeError("[load_safetensors] Invalid json header length"), "cannot read"),
                        (json.JSONDecodeError("Expecting value", "x", 0), "invalid JSON"),
                        (MemoryError(), "out of memory")]:
        monkeypatch.setattr(data_lib, "load_records", raiser(exc))
        one_line_error(*cli("data", "convert", src, "--out", tmp_path / "o.json"), needle)
    monkeypatch.setattr(data_lib, "load_records", raiser(ZeroDivisionError("a real bug")))
    code, out = cli("data", "convert", src, "--out", tmp_path / "o.json")
    assert code == 1 and "Traceback" in out and "ZeroDivisionError: a real bug" in out
    assert "this is a bug in mlx-coconut" in out.strip().splitlines()[-1]


# ---------------------------------------------------------------- 1. NaN guard, loss warnings


def test_diverged_run_never_writes_or_points_at_non_finite_weights(tiny, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(UserError) as e:
        train.run(cfg(tiny, out, learning_rate=1e30, batch_size=2, save_every=1), log=quiet)
    msg = str(e.value)
    assert "diverged" in msg and "not finite" in msg or "loss is" in msg
    saved = sorted(out.glob("ckpt-*"))
    for d in saved:  # whatever is on disk is finite
        for name, w in mx.load(str(next(d.glob("*.safetensors")))).items():
            assert mx.all(mx.isfinite(w)).item(), (d, name)
    if ckpt.is_run_dir(out):  # the pointer names a kept, finite checkpoint, and the message says so
        assert str(ckpt.checkpoint_dir(out)) in msg
        assert all(mx.all(mx.isfinite(w)).item() for w in checkpoint_weights(out).values())
    else:
        assert "no checkpoint was saved" in msg


def test_save_checkpoint_refuses_non_finite_weights(tiny, tmp_path):
    loaded = ckpt.load(tiny["model"])
    loaded.model.model.norm.weight = loaded.model.model.norm.weight * float("nan")
    with pytest.raises(UserError, match="not finite"):
        ckpt.save_checkpoint(tmp_path / "r", {"weights": "full"}, loaded.model, loaded.tokenizer, None,
                             {"step": 1})
    assert not list((tmp_path / "r").glob("ckpt-*")) and not list((tmp_path / "r").glob(".ckpt-*"))


def test_loss_warnings():
    V = 49152
    assert train.loss_warnings([1.5 - 0.01 * i for i in range(40)], V) == []
    collapsed = train.loss_warnings([1.5, 1.4] + [math.log(V)] * 30, V)
    assert len(collapsed) == 1 and "ln V" in collapsed[0]
    diverging = train.loss_warnings([1.5] * 10 + [6.0] * 20, V)
    assert len(diverging) == 1 and "rose from 1.500" in diverging[0]
    assert train.loss_warnings([math.log(V)] * 5, V) == []  # too few steps to judge


def test_loss_warnings_reach_the_log_and_eval_json(tiny, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(evaluation, "loss_warnings", lambda losses, vocab: [f"flat at {vocab}"])
    train.run(cfg(tiny, tmp_path / "w", eval_samples=2, max_new_tokens=2, epochs=1), log=seen.append)
    vocab = train.vocab_size(ckpt.load(tmp_path / "w").model)
    assert f"warning: flat at {vocab}" in seen
    assert json.loads((tmp_path / "w" / "eval.json").read_text())[-1]["warnings"] == [f"flat at {vocab}"]


# ---------------------------------------------------------------- 2. run-directory lock


def test_second_training_into_the_same_out_is_refused(tiny, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    with files.RunLock(out):
        with pytest.raises(UserError, match="another training process .*is using this run directory"):
            train.run(cfg(tiny, out, epochs=1), log=quiet)
        assert not (out / ckpt.RUN_FILE).exists() and not (out / "metrics.jsonl").exists()
    # released on the way out of a failed run too: the next one trains
    with pytest.raises(UserError):
        train.run(cfg(tiny, out, max_seq_length=3), log=quiet)
    assert train.run(cfg(tiny, out, epochs=1), log=quiet)["steps"] == 2


def test_lock_dies_with_its_process(tmp_path):
    code = f"from mlx_coconut.files import RunLock; import time; RunLock({str(tmp_path)!r}).__enter__(); " \
           f"print('locked', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {p.pid}"):
            files.RunLock(tmp_path).__enter__()
    finally:
        p.kill()
        p.wait()
    with files.RunLock(tmp_path):  # kill -9 released it
        pass


# ---------------------------------------------------------------- 3. no code from a model directory


def test_auto_map_code_is_never_run(tiny, tmp_path):
    model = tmp_path / "evil"
    shutil.copytree(tiny["model"], model)
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg_file = model / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    cfg_file.write_text(json.dumps(config))
    one_line_error(*cli("latent-tokens", "--model", model), "auto_map", "never runs code")
    one_line_error(*cli("data", "stats", tiny["data"], "--model", model), "never runs code")
    with pytest.raises(UserError, match="never runs code"):
        train.run(cfg(tiny, tmp_path / "r", model=str(model)), log=quiet)
    assert not marker.exists()


# ---------------------------------------------------------------- 4. nothing to train on


@pytest.mark.parametrize("flags, needle", [
    (["--max-seq-length", "5"], "nothing to train on"),
    (["--samples", "-60"], "--samples must be >= 1"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_nothing_to_train_on_is_refused(tiny, tmp_path, flags, needle):
    out = tmp_path / "r"
    one_line_error(*cli("train", "--model", tiny["model"], "--train", tiny["data"], "--out", out,
                        "--eval-samples", "0", *flags), needle)
    assert not ckpt.is_run_dir(out)


# ---------------------------------------------------------------- 5. corrupt GGUF


def tiny_gguf(path: Path) -> Path:
    mx.save_gguf(str(path), {"token_embd.weight": mx.ones((4, 32)), "output_norm.weight": mx.ones((32,))},
                 {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2"})
    return path


def test_corrupt_gguf_is_one_line(tmp_path):
    out = tmp_path / "out"
    good = tiny_gguf(tmp_path / "good.gguf").read_bytes()
    nan = bytearray(good)
    nan[-64:] = b"\xff" * 64  # NaN floats in the last tensor's data
    (tmp_path / "nan.gguf").write_bytes(bytes(nan))
    one_line_error(*cli("convert", "--hf-path", tmp_path / "nan.gguf", "--mlx-path", out), "non-finite",
                   "tensor")
    (tmp_path / "short.gguf").write_bytes(good[:-100])
    one_line_error(*cli("convert", "--hf-path", tmp_path / "short.gguf", "--mlx-path", out),
                   "past the end of the file")
    huge = bytearray(good)
    struct.pack_into("<Q", huge, 8, 2 ** 40)  # tensor count
    (tmp_path / "huge.gguf").write_bytes(bytes(huge))
    one_line_error(*cli("convert", "--hf-path", tmp_path / "huge.gguf", "--mlx-path", out), "corrupt")
    (tmp_path / "cut.gguf").write_bytes(good[:40])
    one_line_error(*cli("convert", "--hf-path", tmp_path / "cut.gguf", "--mlx-path", out), "GGUF")
    assert not out.exists() and [p.name for p in tmp_path.glob(".*")] == []


# ---------------------------------------------------------------- 6. HF directory validated at convert


@pytest.fixture()
def hf_dir(tmp_path, smollm2_dir):
    from test_convert import tiny_hf_dir
    tiny_hf_dir(tmp_path / "hf", smollm2_dir)
    return tmp_path / "hf"


def test_hf_dir_problems_are_found_at_convert_time(hf_dir, tmp_path):
    out = tmp_path / "out"

    def refused(*needles):
        one_line_error(*cli("convert", "--hf-path", hf_dir, "--mlx-path", out), *needles)
        assert not out.exists() and not [p for p in tmp_path.glob(".out*")]

    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    refused("shape", "hidden_size 128")
    (hf_dir / "config.json").write_text(json.dumps(config)[:-5])
    refused("config.json", "invalid JSON")
    (hf_dir / "config.json").write_text(json.dumps(config))
    shard = hf_dir / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    refused(shard.name, "truncated or corrupt")
    shard.write_bytes(data)
    (hf_dir / "tokenizer.json").unlink()
    refused("no tokenizer")


# ---------------------------------------------------------------- 7. full / read-only disk


def test_full_disk_during_convert_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    from mlx_coconut.convert import save

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", a[0])

    monkeypatch.setattr(save.mx, "save_safetensors", full)
    one_line_error(*cli("convert", "--hf-path", hf_dir, "--mlx-path", tmp_path / "out"), "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_unwritable_target_is_refused_before_the_long_work(hf_dir, tmp_path, monkeypatch):
    from mlx_coconut.convert import save

    monkeypatch.setattr(save, "load_source", lambda *a, **k: pytest.fail("loaded before checking"))
    (tmp_path / "file").write_text("x")
    one_line_error(*cli("convert", "--hf-path", hf_dir, "--mlx-path", tmp_path / "file" / "out"),
                   "cannot write there")


def test_full_disk_on_data_convert_and_checkpoint_leaves_no_temp(tiny, tmp_path, monkeypatch):
    real = Path.write_text

    def full(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full)
        one_line_error(*cli("data", "convert", tiny["data"], "--out", tmp_path / "o.json"), "No space")
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "run"
    train.run(cfg(tiny, out, epochs=1, stop_after_steps=1), log=quiet)
    before = ckpt.checkpoint_dir(out)

    def full_opt(file, flat):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(ckpt, "_write_optimizer", full_opt)
    one_line_error(*cli("train", "--resume", "--out", out), "No space left")
    assert ckpt.checkpoint_dir(out) == before and before.is_dir()
    assert [p.name for p in out.glob(".*") if p.name != ".lock"] == []


@pytest.fixture()
def small_disk(tmp_path):
    """Mount a tmpfs of `size` bytes for the test: `small_disk(size)` → its directory. Needs root
    (Linux); skipped where mounting is not permitted."""
    mounted = []

    def mount(size: int) -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                               capture_output=True, text=True)
        except OSError as e:
            pytest.skip(f"cannot mount a tmpfs here: {e}")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], check=True)


def _model_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.iterdir())


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(tiny, small_disk, monkeypatch):
    """A tmpfs half the size of the output: refused before writing, naming the path and the space;
    and when the disk fills up during the write anyway (another writer: here the check is skipped),
    MLX's RuntimeError "[write] ..." becomes the same kind of line, and nothing partial is left."""
    need = _model_bytes(tiny["model"])
    disk = small_disk(need // 2)
    out = disk / "model"
    one_line_error(*cli("convert", "--hf-path", tiny["model"], "--mlx-path", out, "--dtype", "float32"),
                   str(out), "not enough disk space", "needs 0.", " MB, 0.")
    assert list(disk.iterdir()) == []
    monkeypatch.setattr(files, "check_free_space", lambda *a: None)
    one_line_error(*cli("convert", "--hf-path", tiny["model"], "--mlx-path", out, "--dtype", "float32"),
                   str(out), "disk filled up")
    assert list(disk.iterdir()) == []


def test_checkpoint_onto_a_full_disk_is_one_line_and_leaves_no_checkpoint(tiny, small_disk, monkeypatch):
    """train --out on a tmpfs too small for one checkpoint: one line naming the checkpoint and the
    space it needs; no checkpoint, no temp directory; the same when the disk fills up mid-write."""
    disk = small_disk(_model_bytes(tiny["model"]) // 2)  # the optimizer state alone is 2x the weights
    args = ["train", "--model", tiny["model"], "--train", tiny["data"], "--epochs", "1",
            "--eval-samples", "0", "--samples", "8", "--dtype", "float32"]
    one_line_error(*cli(*args, "--out", disk / "run"), str(disk / "run" / "ckpt-0000001"),
                   "not enough disk space", "needs ")
    assert not ckpt.is_run_dir(disk / "run")
    assert sorted(p.name for p in (disk / "run").iterdir()) == [".lock", "metrics.jsonl"]
    monkeypatch.setattr(files, "check_free_space", lambda *a: None)
    one_line_error(*cli(*args, "--out", disk / "run2"), str(disk / "run2" / "ckpt-0000001"),
                   "disk filled up")
    assert sorted(p.name for p in (disk / "run2").iterdir()) == [".lock", "metrics.jsonl"]


def test_free_space_is_checked_before_writing(tiny, tmp_path, monkeypatch):
    """The same refusals from the free space the filesystem reports (any OS): before anything is
    written, naming the output and the bytes it needs."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "model"
    one_line_error(*cli("convert", "--hf-path", tiny["model"], "--mlx-path", out), str(out),
                   "needs ", "0.0 MB free")
    assert not out.exists() and [p for p in tmp_path.iterdir()] == []
    run = tmp_path / "run"
    with pytest.raises(UserError, match="not enough disk space"):
        train.run(cfg(tiny, run, epochs=1, samples=8), log=quiet)
    assert not ckpt.is_run_dir(run) and not list(run.glob(".ckpt-*")) and not list(run.glob("ckpt-*"))


# ---------------------------------------------------------------- 8. stale temp dirs, SIGTERM


def test_rerun_and_resume_remove_stale_temp_dirs(tiny, tmp_path, hf_dir):
    out = tmp_path / "run"
    train.run(cfg(tiny, out, epochs=1, stop_after_steps=1), log=quiet)
    stale = out / f".ckpt-0000002.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    train.run(train.TrainConfig(out=str(out), resume=True), log=quiet)
    assert not stale.exists()
    # convert: dead processes' temp dirs go, a live process's stays
    dead, live = tmp_path / f".m.tmp-{dead_pid()}", tmp_path / f".m.tmp-{os.getppid()}"
    dead.mkdir()
    live.mkdir()
    code, output = cli("convert", "--hf-path", hf_dir, "--mlx-path", tmp_path / "m")
    assert code == 0, output
    assert not dead.exists() and live.exists()


def test_sigterm_during_training_saves_like_ctrl_c(tiny, tmp_path):
    out = tmp_path / "term"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-c", "from mlx_coconut.cli import main; main()", "train",
                          "--model", str(tiny["model"]), "--train", str(tiny["data"]), "--out", str(out),
                          "--eval-samples", "0", "--batch-size", "1", "--epochs", "50", "--save-every", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "interrupted: saved" in stdout
    assert ckpt.is_run_dir(out) and [x.name for x in out.glob(".*") if x.name != ".lock"] == []


# ---------------------------------------------------------------- 9. resume conflicts, LoRA base


def test_resume_refuses_conflicting_flags_and_an_edited_config(tiny, tmp_path):
    out = tmp_path / "run"
    train.run(cfg(tiny, out, epochs=1, stop_after_steps=1), log=quiet)
    for flags, needle in [(["--batch-size", "2"], "--batch-size 2"), (["--lr", "5"], "--learning-rate 5"),
                          (["--train", tmp_path / "other.json"], "--train")]:
        one_line_error(*cli("train", "--resume", "--out", out, *flags), needle, "only --epochs")
    run_file = out / ckpt.RUN_FILE
    run = json.loads(run_file.read_text())
    run["config"]["batch_size"] = 4
    run_file.write_text(json.dumps(run))
    one_line_error(*cli("train", "--resume", "--out", out), "was edited", "batch_size 8 -> 4")


def test_lora_run_checks_its_base_model(tiny, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny["model"], base)
    out = tmp_path / "lora"
    train.run(cfg(tiny, out, model=str(base), lora=True, lora_rank=2, epochs=1), log=quiet)
    assert ckpt.load(out).model is not None
    records = synth_records(16, seed=0, min_steps=1, max_steps=2)
    shutil.rmtree(base)
    make_tiny_model(base, records, hidden=32)  # a different model where the base was
    with pytest.raises(UserError, match="not the one the adapters were trained on.*hidden_size 64 -> 32"):
        ckpt.load(out)


# ---------------------------------------------------------------- 10. prompt length, --c-thought


def test_overlong_prompt_and_huge_c_thought_are_refused(tiny):
    long_prompt = " ".join(["Tom has 12 apples and 7 pears"] * 600)
    start = time.perf_counter()
    one_line_error(*cli("generate", "--model", tiny["model"], "--prompt", long_prompt),
                   "max_position_embeddings 2048")
    assert time.perf_counter() - start < 30
    one_line_error(*cli("data", "stats", tiny["data"], "--c-thought", "100000000"), "--c-thought")
    with pytest.raises(UserError, match="c-thought"):
        train.resolve(cfg(tiny, "x", stage=1, c_thought=100000))


# ---------------------------------------------------------------- 11. metrics.jsonl


def test_resume_truncates_metrics_and_json_never_holds_nan(tiny, tmp_path):
    out = tmp_path / "run"
    train.run(cfg(tiny, out, batch_size=4, epochs=1, stop_after_steps=2), log=quiet)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # as if killed after logging steps 3 and 4 but before their checkpoint
    metrics.write_text("".join(l + "\n" for l in lines) + json.dumps({"step": 3}) + "\n" + '{"step": 4, "lo')
    train.run(train.TrainConfig(out=str(out), resume=True), log=quiet)
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # a new run in a failed run's directory starts a fresh metrics file
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 9, "lr": NaN}\n')
    train.run(cfg(tiny, fresh, epochs=1), log=quiet)
    assert [json.loads(l)["step"] for l in (fresh / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    files.append_jsonl(fresh / "x.jsonl", {"lr": float("nan"), "loss": float("inf")})
    files.write_json_atomic(fresh / "x.json", {"v": [float("nan")]})
    assert json.loads((fresh / "x.jsonl").read_text()) == {"lr": None, "loss": None}
    assert json.loads((fresh / "x.json").read_text()) == {"v": [None]}


# ---------------------------------------------------------------- 12. flag validation


@pytest.mark.parametrize("flags, needle", [
    (["--lora-dropout", "5"], "--lora-dropout"),
    (["--lr", "nan"], "--learning-rate must be a finite"),
    (["--lora", "--lora-rank", "0"], "--lora-rank"),
    (["--lora", "-q", "4", "--q-group-size", "7"], "--q-group-size"),
    (["--weight-decay", "inf"], "--weight-decay"),
])
def test_bad_train_flags_are_one_line(tiny, tmp_path, flags, needle):
    one_line_error(*cli("train", "--model", tiny["model"], "--train", tiny["data"], "--out",
                        tmp_path / "r", *flags), needle)


def test_bad_generate_flags_and_env_are_one_line(tiny, tmp_path):
    one_line_error(*cli("latent-tokens", "--model", tiny["model"], "--prompt", ""), "--prompt")
    one_line_error(*cli("generate", "--model", tiny["model"], "--prompt", ""), "--prompt")
    one_line_error(*cli("generate", "--model", tiny["model"], "--prompt", "hi", "--temp", "nan"), "--temp")
    base = [sys.executable, "-c", "from mlx_coconut.cli import main; main()", "train", "--model",
            str(tiny["model"]), "--out", str(tmp_path / "e")]
    for env, needle in [({"MLX_COCONUT_TIMEOUT": "abc"}, "MLX_COCONUT_TIMEOUT"),
                        ({"MLX_HOSTFILE": "/nonexistent"}, "MLX_HOSTFILE=/nonexistent")]:
        r = subprocess.run(base, capture_output=True, text=True, env=dict(os.environ, **env), timeout=120)
        one_line_error(r.returncode, r.stderr, needle)


def test_truncated_optimizer_state_and_lora_init_conflicts(tiny, tmp_path):
    out = tmp_path / "run"
    train.run(cfg(tiny, out, epochs=1, stop_after_steps=1), log=quiet)
    opt = ckpt.checkpoint_dir(out) / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    one_line_error(*cli("train", "--resume", "--out", out), "optimizer.safetensors", "truncated")
    lora = tmp_path / "lora"
    train.run(cfg(tiny, lora, lora=True, lora_rank=2, epochs=1), log=quiet)
    with pytest.raises(UserError, match="--lora-rank 16.*keep training with lora-rank 2"):
        train.resolve(train.TrainConfig(init=str(lora), out=str(tmp_path / "next"), stage=1,
                                        lora=True, lora_rank=16))
    cfg2, _ = train.resolve(train.TrainConfig(init=str(lora), out=str(tmp_path / "next"), stage=1, lora=True))
    assert cfg2.lora_rank == 2  # inherited: what is recorded is what trains


# ---------------------------------------------------------------- 13. checkpoints inside the run


def test_checkpoint_pointer_cannot_leave_the_run_dir(tiny, tmp_path):
    out = tmp_path / "run"
    train.run(cfg(tiny, out, epochs=1, stop_after_steps=1), log=quiet)
    other = tmp_path / "other"
    shutil.copytree(ckpt.checkpoint_dir(out), other)
    run = json.loads((out / ckpt.RUN_FILE).read_text())
    for bad in ["../other", str(other), "ckpt-1/../../other"]:
        (out / ckpt.RUN_FILE).write_text(json.dumps({**run, "checkpoint": bad}))
        with pytest.raises(UserError, match="not a checkpoint of this run directory"):
            ckpt.load(out)
        one_line_error(*cli("generate", "--model", out, "--prompt", "hi"), "not a checkpoint")
