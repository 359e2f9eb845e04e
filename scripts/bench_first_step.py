"""Time to the first optimizer step: `mlx-coconut train` vs `mlx_lm lora`, same model, records, LoRA.

Each side runs as a user runs it, in a fresh subprocess (cold Python, warm file cache: one untimed
run of each side first), alternating the sides for --repeats rounds. The time is wall clock from
starting the process to the line it prints once its first optimizer step is done (the process is then
stopped with SIGTERM):

- ours:   `mlx-coconut train --stage 0 --lora ...` (the console script, or `python -m mlx_coconut.cli`)
          on the --records GSM8k train records, one epoch, no evaluation (--eval-samples 0): its
          "first step done" line (after the step; the same line gives its own phases);
- mlx-lm: `mlx_lm lora --train` (its CLI, started after `import mlx_coconut` so that it runs on
          the same BLAS: see PEER) on the same records, formatted by our stage-0 formatter and
          decoded to text (`{"text": ...}` lines: the same tokens, a row may differ by a token), with
          the same LoRA (rank, scale, dropout 0, every projection of every layer), AdamW, batch size,
          --iters 1 and --steps-per-report 1: its iteration-1 report line. No valid.jsonl, so mlx-lm
          runs no validation pass at iteration 1 (it would otherwise, before the step).

With --records equal to --batch-size (the default) both sides train the same single batch. Both
processes inherit this one's environment (LD_PRELOAD included, so ours does not re-execute).
Also printed: each side's phases from the time its progress lines appear (ours: its own line).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_first_step.py
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

GOAL = 1.2
OURS_DONE = re.compile(r"first step done ([\d.]+) s after start \((.*)\)")
PEER_DONE = re.compile(r"^\s*1\s+[\d.]+\s+[▼▲]")  # mlx-lm's report of iteration 1
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def prepare(path, args, tmp: Path) -> dict:
    """The records for ours, the same examples as text for mlx-lm, and both LoRA configs."""
    from mlx_coconut.checkpoint import load_tokenizer
    from mlx_coconut.data import (FormatConfig, add_latent_special_ids, format_record, load_records,
                                  save_records)

    data = args.data or bc.SHARED_DATA / "gsm8k" / "gsm8k_train.jsonl"
    records = load_records(data)[:args.records]
    save_records(records, tmp / "records.json")
    tokenizer = load_tokenizer(path)
    ids = add_latent_special_ids(tokenizer)
    examples = [format_record(r, tokenizer, FormatConfig(mode="cot"), ids) for r in records]
    texts = [tokenizer.decode([t for t in e.input_ids if t != ids.eos]) for e in examples]
    (tmp / "lm").mkdir()
    with open(tmp / "lm" / "train.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    peer_tokens = sum(len(tokenizer.encode(t)) + 1 for t in texts)
    config = {"fine_tune_type": "lora", "num_layers": -1, "optimizer": "adamw",
              "optimizer_config": {"adamw": {"weight_decay": 0.01}},
              "lora_parameters": {"rank": args.lora_rank, "scale": args.lora_scale, "dropout": 0.0}}
    (tmp / "lm.yaml").write_text(json.dumps(config))  # JSON is YAML
    return {"ours_tokens": sum(len(e.input_ids) for e in examples), "peer_tokens": peer_tokens,
            "n": len(records)}


def ours_cmd(path, args, tmp: Path, run: int) -> list:
    script = Path(sys.executable).parent / "mlx-coconut"
    prog = [str(script)] if script.exists() else [sys.executable, "-m", "mlx_coconut.cli"]
    return prog + ["train", "--stage", "0", "--model", str(path), "--train", str(tmp / "records.json"),
                   "--out", str(tmp / f"run{run}"), "--lora", "--lora-rank", str(args.lora_rank),
                   "--lora-scale", str(args.lora_scale), "--batch-size", str(args.batch_size),
                   "--epochs", "1", "--eval-samples", "0", "--save-every", "0", "--lr", "1e-4",
                   "--max-seq-length", "2048"]


# mlx-lm's own CLI, with `import mlx_coconut` first for nothing but the process's libraries: on Linux
# MLX's wheel would otherwise run mlx-lm's matmuls on its reference BLAS (~60x slower), which is no
# yardstick. (It also gets our malloc setting; nothing of our model or training code is used.)
PEER = "import mlx_coconut; from mlx_lm import cli; cli.main()"


def peer_cmd(path, args, tmp: Path, run: int) -> list:
    return [sys.executable, "-c", PEER, "lora", "-c", str(tmp / "lm.yaml"), "--model", str(path),
            "--train", "--data", str(tmp / "lm"), "--batch-size", str(args.batch_size), "--iters", "1",
            "--steps-per-report", "1", "--learning-rate", "1e-4", "--max-seq-length", "2048",
            "--adapter-path", str(tmp / f"adapters{run}"), "--seed", "0"]


def timed_run(cmd, done: re.Pattern, marks: dict) -> dict:
    """Start `cmd`, read its merged output; → seconds to the `done` line and to each of `marks`
    (name → regex, first match), plus the done line's match groups."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, seen, match, lines = {}, {}, None, []
    for line in proc.stdout:
        now = time.perf_counter() - t0
        line = ANSI.sub("", line)  # rich colours mlx-lm's lines even into a pipe
        lines.append(line)
        for name, rx in marks.items():
            if name not in seen and re.search(rx, line):
                seen[name] = now
        if match is None and done.search(line):
            out["s"], match = now, done.search(line)
            proc.terminate()  # the rest of the epoch is not measured (ours saves and stops on SIGTERM)
    proc.wait()
    if match is None:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n" + "".join(lines[-20:]))
    out.update({f"at {k}": v for k, v in seen.items()})
    out["match"] = match
    return out


def main(argv=None):
    p = bc.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--records", type=int, default=None, help="records (default: --batch-size, so both "
                   "sides train the same single batch)")
    p.add_argument("--data", default=None, help="records file (default: ../shared/data/gsm8k/"
                   "gsm8k_train.jsonl, read in place)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-scale", type=float, default=2.0)
    args = p.parse_args(argv)
    args.records = args.records or args.batch_size
    if args.data is None and not (bc.SHARED_DATA / "gsm8k" / "gsm8k_train.jsonl").exists():
        raise SystemExit("../shared/data/gsm8k/gsm8k_train.jsonl not found (or pass --data)")

    path = bc.resolve_model(args.model)
    bc.header("bench_first_step: process start -> first optimizer step done, ours vs mlx-lm")
    tmp = Path(tempfile.mkdtemp(prefix="bench_first_step_"))
    info = prepare(path, args, tmp)
    print(f"model: {path}; {info['n']} GSM8k train records, batch {args.batch_size}; LoRA rank "
          f"{args.lora_rank} scale {args.lora_scale:g} on every projection; tokens ours "
          f"{info['ours_tokens']}, mlx-lm {info['peer_tokens']}")
    runs = {"n": 0}

    def ours():
        runs["n"] += 1
        r = timed_run(ours_cmd(path, args, tmp, runs["n"]), OURS_DONE,
                      {"loaded": r"^training stage 0 "})
        phases = {k: float(v) for k, v in re.findall(r"([a-z+]+) ([\d.]+) s", r.pop("match")[2])}
        return {"s": r["s"], **{f"own {k}": v for k, v in phases.items()}, **r}

    def peer():
        runs["n"] += 1
        r = timed_run(peer_cmd(path, args, tmp, runs["n"]), PEER_DONE,
                      {"loading model": "Loading pretrained model", "loading data": "Loading datasets",
                       "training": "^Training"})
        r.pop("match")
        return r

    try:
        res = bc.alternate({"ours": ours, "mlx-lm": peer}, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    o, pr = bc.median(res["ours"], "s"), bc.median(res["mlx-lm"], "s")
    ratio = bc.paired_ratio(res["ours"], res["mlx-lm"], "s")
    print(f"seconds to the first optimizer step (median of {args.repeats}): ours {o:.2f}, mlx-lm {pr:.2f}")
    for name in ("ours", "mlx-lm"):
        keys = [k for k in res[name][0] if k != "s"]
        print(f"  {name}: " + ", ".join(f"{k} {bc.median(res[name], k):.2f}" for k in keys
                                        if all(k in r for r in res[name])))
    print(f"RATIO ours/mlx-lm time to first step = {ratio:.3f} (median of per-round ratios; ratio of "
          f"medians {o / pr:.3f}) (goal <= {GOAL}: {bc.verdict(ratio <= GOAL)})")
    return {"ratio": ratio, "ours_s": o, "mlx_lm_s": pr}


if __name__ == "__main__":
    main()
