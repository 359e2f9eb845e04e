"""The `mlx-coconut` command line: a thin click layer over the library.

Every command turns an expected failure (a `UserError`, any OSError, a corrupt file) into one line on
stderr and exit code 2; a real bug keeps its traceback, followed by a line asking to report it.
"""

import functools
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import click

from .errors import UserError, describe

_STARTED = [time.perf_counter()]  # ~ the process start (mlx is imported later)


def process_start():
    """The process start, for the first `train` of the process to time its set-up from (imports
    included); None afterwards, so that later in-process runs (the quickstart's) count from their own
    start."""
    return _STARTED.pop() if _STARTED else None


def friendly_errors(fn):
    """Expected failures: one line, exit 2. Ctrl-C: one line, exit 130. Anything else: traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C: temp files and dirs are cleaned up
        term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        if term == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            line = describe(e)
            if line is None:
                traceback.print_exc()
                click.echo(f"error: this is a bug in mlx-coconut ({type(e).__name__}); please report "
                           f"it with the command line and the traceback above", err=True)
                sys.exit(1)
            click.echo(f"error: {line}", err=True)
            sys.exit(2)
        finally:
            if term == signal.SIG_DFL:
                signal.signal(signal.SIGTERM, term)

    return wrapper


def _interrupt(*_):
    raise KeyboardInterrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-coconut")
def main():
    """COCONUT (continuous latent reasoning) for Llama models in MLX."""


# ---------------------------------------------------------------- data
@main.group()
def data():
    """Download, convert, synthesise and inspect {question, steps, answer} datasets."""


def _progress(label, total):
    return click.progressbar(length=total, label=f"downloading {label}", file=sys.stderr)


@data.command()
@click.argument("dataset", type=click.Choice(["gsm8k", "prosqa", "prontoqa"]))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "valid", "test"]),
              help="Only these splits (repeatable) [default: all three; GSM8k train is 87 MB].")
@click.option("--source", default=None, metavar="FILE|URL",
              help="prontoqa: the 5hop_0shot_random.json generated with the ProntoQA repository.")
@friendly_errors
def download(dataset, out_dir, splits, source):
    """Fetch a dataset as train/valid/test.json (official sources at pinned commits).

    
    gsm8k:    the iCoT splits the official preprocessing uses
    prosqa:   data/prosqa_*.json of facebookresearch/coconut
    prontoqa: converts --source (5hop_0shot_random.json) as the official preprocessing/prontoqa.py
    """
    from . import data as D

    splits = splits or ("train", "valid", "test")
    if source and dataset != "prontoqa":
        raise UserError(f"--source is for prontoqa (a generated file); {dataset} is downloaded")
    if dataset == "prontoqa":
        counts = D.download_prontoqa(out_dir, source, splits, progress=_progress)
    else:
        fn = D.download_gsm8k if dataset == "gsm8k" else D.download_prosqa
        counts = fn(out_dir, splits, progress=_progress)
    for split, n in counts.items():
        click.echo(f"{split}: {n} records -> {out_dir}/{split}.json")


@data.command(name="convert")
@click.argument("input_path", metavar="INPUT")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSON list.")
@click.option("--format", "fmt", type=click.Choice(["icot", "json", "gsm8k"]), default=None,
              help="Input format [default: detected].")
@friendly_errors
def convert_data(input_path, out, fmt):
    """Convert iCoT text / GSM8k jsonl / JSON to the official {question, steps, answer} JSON list."""
    from .data import load_records, save_records, step_distribution

    records = load_records(input_path, fmt)
    save_records(records, out)
    dist = step_distribution(records)
    click.echo(f"{len(records)} records ({dist.get(0, 0)} without steps) -> {out}")


@data.command()
@click.option("--n", type=int, required=True, help="Number of problems.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSON list.")
@click.option("--min-steps", type=int, default=1, show_default=True)
@click.option("--max-steps", type=int, default=5, show_default=True)
@click.option("--ops", default="add,sub,mul,div,ref", show_default=True,
              help="Step kinds: add, sub, mul, div, ref (reuse the first result). Difficulty knob.")
@click.option("--max-value", type=int, default=999, show_default=True,
              help="Bound on every operand and intermediate result. Difficulty knob.")
@click.option("--style", type=click.Choice(["story", "terse"]), default="story", show_default=True,
              help="Wording: story (grade-school sentences) or terse (the same problem in about half "
                   "the tokens).")
@click.option("--exclude", "exclude_files", multiple=True, metavar="FILE",
              help="Skip questions found in these record files (repeatable): a held-out split.")
@friendly_errors
def synth(n, seed, out, min_steps, max_steps, ops, max_value, style, exclude_files):
    """Synthetic word problems with calculator steps (<<a*b=c>>) and integer answers."""
    from .data import load_records, save_records, step_distribution, synth_records

    exclude = {r.question for f in exclude_files for r in load_records(f)}
    records = synth_records(n, seed, min_steps, max_steps, exclude=exclude,
                            ops=[o.strip() for o in ops.split(",") if o.strip()], max_value=max_value, style=style)
    save_records(records, out)
    dist = "  ".join(f"{k}:{v}" for k, v in step_distribution(records).items())
    held = f", none of the {len(exclude)} excluded questions" if exclude else ""
    click.echo(f"{n} records (steps {dist}{held}) -> {out}")


@data.command()
@click.argument("path")
@click.option("--model", "model_dir", default=None, help="Model directory: render with its tokenizer "
              "and add token-length statistics.")
@click.option("--c-thought", type=int, default=2, show_default=True, help="c for the second stage-1 view.")
@click.option("--format", "fmt", type=click.Choice(["icot", "json", "gsm8k"]), default=None)
@click.option("--index", type=int, default=0, show_default=True, help="Which record to show.")
@friendly_errors
def stats(path, model_dir, c_thought, fmt, index):
    """Count, step distribution, one record raw and as the model sees it (stage 0, stage 1 c=1 / c=C)."""
    from .checkpoint import load_tokenizer
    from .data import MAX_C_THOUGHT, load_records, stats_report
    from .errors import UserError

    if not 1 <= c_thought <= MAX_C_THOUGHT:
        raise UserError(f"--c-thought must be between 1 and {MAX_C_THOUGHT} (got {c_thought})")
    records = load_records(path, fmt)
    tokenizer = load_tokenizer(model_dir) if model_dir else None
    click.echo(stats_report(records, tokenizer, c_thought=c_thought, index=index))


# ---------------------------------------------------------------- convert
@main.command()
@click.option("--hf-path", required=True, metavar="SRC",
              help="Hub id (meta-llama/Llama-3.1-8B-Instruct), local HF directory, or a .gguf file.")
@click.option("--mlx-path", required=True, metavar="DIR", help="Output directory, e.g. weights/NAME.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Weight dtype [default: the checkpoint's; GGUF: bfloat16 on Mac, float32 on Linux].")
@click.option("-q", "--quantize", is_flag=True, help="Quantize matrices (affine, like mlx_lm.convert -q).")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing --mlx-path.")
@friendly_errors
def convert(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, force):
    """Convert HF safetensors or a llama.cpp GGUF (Q4_0/Q4_1/Q8_0/F16/F32) to an MLX directory."""
    from mlx_coconut.convert import convert as run

    run(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=int(q_bits),
        q_group_size=int(q_group_size), force=force, log=click.echo)


@main.command(name="latent-tokens")
@click.option("--model", "model_path", required=True, metavar="DIR", help="A converted model directory.")
@click.option("--prompt", default="The capital of France is", show_default=True)
@click.option("--max-tokens", default=12, show_default=True)
@friendly_errors
def latent_tokens(model_path, prompt, max_tokens):
    """Add <|start-latent|> <|latent|> <|end-latent|> in memory; show ids and a greedy check."""
    import mlx.core as mx

    from .checkpoint import load_tokenizer
    from .model import load_model
    from .tokens import add_latent_tokens, vocab_rows

    if not prompt.strip():
        raise UserError("--prompt is empty")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1 (got {max_tokens})")
    model, _ = load_model(model_path)
    tokenizer = load_tokenizer(model_path)

    def greedy():
        ids = tokenizer.encode(prompt)
        n = len(ids)
        for _ in range(max_tokens):  # full recompute: a dozen tokens, no cache needed
            ids.append(model(mx.array([ids]))[0, -1].argmax().item())
        return tokenizer.decode(ids[n:])

    before = (len(tokenizer._tokenizer), vocab_rows(model))
    text_before = greedy()
    ids = add_latent_tokens(model, tokenizer)
    after = (len(tokenizer._tokenizer), vocab_rows(model))
    text_after = greedy()
    click.echo(f"tokenizer vocab {before[0]} -> {after[0]}, embedding rows {before[1]} -> {after[1]}")
    click.echo(f"ids: <|start-latent|>={ids.start} <|latent|>={ids.latent} <|end-latent|>={ids.end} "
               f"(rows initialised from '<<')")
    click.echo(f"greedy before: {prompt}{text_before!r}")
    click.echo(f"greedy after:  {prompt}{text_after!r} ({'unchanged' if text_after == text_before else 'CHANGED'})")


# ---------------------------------------------------------------- train
def _train_options(fn):
    """The `train` flags, built from the TrainConfig fields (one declaration: name, type, help,
    default). Every flag defaults to None so -c/--config YAML and an --init run can fill it."""
    import typing
    from dataclasses import fields

    from .options import TrainConfig, help_text

    opts = [click.option("-c", "--config", "config_file", type=click.Path(),
                         help="YAML file with any of these options (flags win).")]
    for f in fields(TrainConfig):
        m = f.metadata
        if not m["cli"]:
            continue
        name = "--" + f.name.replace("_", "-")
        param = "train_file" if f.name == "train" else f.name  # `train` is this command's name
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)
        if f.name == "resume":
            decls, kw = (name,), dict(is_flag=True, default=None)
        elif kind is bool:
            decls, kw = (f"{name}/--no-{name[2:]}",), dict(default=None)
        else:
            decls = (*[x for x in m["flags"] if not x.startswith("--")], name,
                     *[x for x in m["flags"] if x.startswith("--")])
            kw = dict(type=click.Choice(m["choices"]) if m["choices"] else kind)
        opts.append(click.option(*decls, param, help=help_text(f), **kw))
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@_train_options
@friendly_errors
def train(config_file, train_file, **flags):
    """Train stage 0 (CoT) or stage k (COCONUT): full fine-tune, --lora or QLoRA (--lora -q 4).

    \b
    mlx-coconut train --stage 0 --model weights/llama-3.1-8b --train data/gsm8k/train.json \\
        --valid data/gsm8k/valid.json --samples 10000 --epochs 3 --batch-size 8 --out runs/stage0
    mlx-coconut train --stage 1 --c-thought 1 --init runs/stage0 --out runs/stage1
    """
    from . import train as train_lib

    values = {}
    if config_file:
        import yaml
        try:
            with open(config_file) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise UserError(f"-c {config_file}: cannot read ({e.strerror})")
        except yaml.YAMLError as e:
            raise UserError(f"-c {config_file}: invalid YAML ({str(e).splitlines()[0]})")
        if not isinstance(loaded, dict):
            raise UserError(f"-c {config_file}: expected a mapping of option: value")
        values.update(loaded)
    flags["train"] = train_file
    values.update({k: v for k, v in flags.items() if v is not None})
    values.setdefault("stage", 0)
    values["resume"] = bool(values.get("resume"))
    config = train_lib.config_from_dict(values, f"-c {config_file}" if config_file else "train")
    try:
        result = train_lib.run(config, started=process_start())
    except KeyboardInterrupt:
        raise UserError("interrupted") from None
    if result.get("interrupted"):
        sys.exit(130)  # saved; the conventional exit status of a Ctrl-C'd command


# ---------------------------------------------------------------- generate


def _check_generate_flags(prompt, max_tokens, temp, top_p, top_k):
    import math

    if top_k < 1:
        raise UserError(f"--top-k must be >= 1 (got {top_k})")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1 (got {max_tokens})")
    if not prompt.strip():
        raise UserError("--prompt is empty")
    if not (math.isfinite(temp) and temp >= 0) or not 0 < top_p <= 1:
        raise UserError("--temp must be a finite number >= 0 and --top-p in (0, 1]")


def _echo_thoughts(ids, prompt_ids, described, show_latents):
    """The latent phase as text: the markers, one line per thought (its nearest tokens and norm with
    --show-latents), or the pause tokens when nothing is fed back."""
    if ids.start_latent in prompt_ids:
        click.echo("<|start-latent|>")
    for d in described:
        line = f"  thought {d['index'] + 1}"
        if show_latents:
            top = "  ".join(f"{t['token']!r} {t['prob']:.3f}" for t in d["top_k"])
            line += f"  norm {d['norm']:.2f}  {top}"
        click.echo(line)
    if not described:  # pause mode: latents are ordinary (learned) tokens, nothing is fed back
        for i in range(prompt_ids.count(ids.latent)):
            click.echo(f"  <|latent|> {i + 1} (pause token)")
    if ids.end_latent in prompt_ids:
        click.echo("<|end-latent|>")


@main.command()
@click.option("--model", "model_path", required=True, metavar="DIR",
              help="A converted model directory or a training run (RUN, RUN:best, RUN:latest).")
@click.option("--prompt", required=True, metavar="Q", help="The question.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--show-latents", is_flag=True,
              help="Per continuous thought: its top-k nearest tokens through the output head, and its L2 norm.")
@click.option("--top-k", type=int, default=5, show_default=True, help="Tokens shown per thought.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights (default: as stored; use float32 on a Linux CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@friendly_errors
def generate(model_path, prompt, max_tokens, temp, top_p, seed, show_latents, top_k, dtype, as_json):
    """Latent-then-text generation: the question, the continuous thoughts, then the answer."""
    import json
    import time

    import mlx.core as mx

    from . import api

    _check_generate_flags(prompt, max_tokens, temp, top_p, top_k)
    if seed is not None:
        mx.random.seed(seed)
    start = time.perf_counter()
    loaded = api.load(model_path, dtype=getattr(mx, dtype) if dtype else None)
    load_time = time.perf_counter() - start
    tok, eos = loaded.tokenizer, set(api.eos_ids(loaded.tokenizer))
    described = []

    def on_thoughts(thoughts, mask):  # between the latent and the text phase: print the thoughts
        rows = thoughts[0][mx.array(mask[0].nonzero()[0])] if thoughts is not None else None
        described.extend(api.describe_thoughts(loaded, rows, top_k))
        if not as_json:
            _echo_thoughts(api.special_ids(loaded), prompt_ids, described, show_latents)

    detok = tok.detokenizer
    detok.reset()

    def on_token(step, ids):  # stream text as it is decoded
        if as_json or int(ids[0]) in eos:
            return
        detok.add_token(int(ids[0]))
        click.echo(detok.last_segment, nl=False)
        sys.stdout.flush()

    prompt_ids = api.prompt_ids(loaded, prompt)
    if not as_json:
        click.echo(prompt)
    [answer] = api.generate_answers(loaded, [prompt], max_tokens, temp, top_p, batch_size=1,
                                    return_thoughts=True, on_token=on_token, on_thoughts=on_thoughts)
    t = answer.timings
    timings = {"load_s": load_time, "latent_s": t["latent"], "text_s": t["text"],
               "prompt_tokens": len(prompt_ids), "thoughts": len(described),
               "generated_tokens": len(answer.tokens),
               "tokens_per_s": len(answer.tokens) / t["text"] if t["text"] > 0 else 0.0}
    if as_json:
        thoughts = described if show_latents else [{k: d[k] for k in ("index", "norm")} for d in described]
        s = loaded.settings
        click.echo(json.dumps({
            "model": str(loaded.path), "mode": s.mode, "stage": s.stage, "c_thought": s.c_thought,
            "prompt": prompt, "prompt_ids": prompt_ids, "tokens": answer.tokens, "text": answer.text,
            "finished": answer.finished, "thoughts": thoughts, "timings": timings}))
        return
    detok.finalize()
    click.echo(detok.last_segment)
    click.echo(f"[latent phase {timings['latent_s']:.3f}s: prefill {len(prompt_ids)} tokens + "
               f"{len(described)} thoughts | text phase {timings['text_s']:.3f}s: "
               f"{len(answer.tokens)} tokens, {timings['tokens_per_s']:.1f} tok/s"
               f"{'' if answer.finished else ', hit --max-tokens'} | load {load_time:.1f}s]")


# ---------------------------------------------------------------- eval / plot / quickstart
def _eval_progress(label, total):
    return click.progressbar(length=total, label=f"{label:<20}", file=sys.stderr, show_pos=True)


@main.command(name="eval")
@click.option("--model", "models", required=True, multiple=True, metavar="DIR",
              help="Model or run directory: RUN, RUN:best, RUN:latest (repeat to compare; the first "
              "is the baseline).")
@click.option("--data", "data_path", required=True, metavar="FILE", help="Test records (JSON/jsonl/iCoT).")
@click.option("--samples", type=int, default=None, help="Only the first N records [all].")
@click.option("--batch-size", type=int, default=None, help="Questions generated at once [32].")
@click.option("--max-tokens", type=int, default=None,
              help="New tokens per answer [as official: 64 when every answer is a number (GSM8k), else 128].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights (default: as stored; use float32 on a Linux CPU).")
@click.option("--examples", "n_examples", type=int, default=3, show_default=True, help="Examples printed.")
@click.option("--report", default=None, metavar="MD", help="Write a markdown report.")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write all results as JSON.")
@friendly_errors
def eval_cmd(models, data_path, samples, batch_size, max_tokens, dtype, n_examples, report, json_path):
    """Evaluate stages side by side: accuracy, tokens, time, CoT exact match, examples."""
    import mlx.core as mx

    from .data import load_records
    from . import report as rep

    if any(v is not None and v < 1 for v in (batch_size, max_tokens, samples)):
        raise UserError("--batch-size, --max-tokens and --samples must be >= 1")
    from .evaluate import BATCH_SIZE
    batch_size = batch_size or BATCH_SIZE
    records = load_records(data_path)[:samples]
    if max_tokens is None:
        from .evaluate import default_max_tokens
        max_tokens = default_max_tokens(records)
    results = rep.compare(models, records, batch_size, max_tokens,
                          getattr(mx, dtype) if dtype else None, progress=_eval_progress)
    click.echo(rep.render_text(results, n_examples))
    rep.write_outputs(results, report, json_path, data_path, max_tokens)
    for path in (report, json_path):
        if path:
            click.echo(f"wrote {path}")


@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--out", default="curves.png", show_default=True, help="Output image (.png, .pdf, .svg).")
@click.option("--results", default=None, metavar="JSON", help="An `eval --json` file: adds a panel of "
              "test accuracy against tokens per question.")
@friendly_errors
def plot(runs, out, results):
    """Training loss and validation accuracy over steps, per stage (needs matplotlib)."""
    from .report import plot_runs

    click.echo(f"wrote {plot_runs(runs, out, results)}")


@main.command()
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Directory for weights, data, runs and the report [quickstart; quickstart-seedN "
              "with --seed N].")
@click.option("--budget", type=click.Choice(["default", "long", "small"]), default="default",
              show_default=True, help="default: CoT, no-CoT and COCONUT (28 min measured on a shared "
              "2-core CPU); long: the paper's Table 1 in miniature, with the controls and the whole curriculum "
              "(reuses a default run's runs in the same --out); small: every row, tiny (the CI test).")
@click.option("--small", is_flag=True, help="Same as --budget small.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Another draw of the same task: new questions in every split, data order, init.")
@click.option("--force", is_flag=True, help="Retrain even if the runs in --out are complete.")
@click.pass_context
@friendly_errors
def quickstart(ctx, out_dir, budget, small, seed, force):
    """The main job on an embedded default: SmolLM2-135M + synthetic problems; CoT, no-CoT and
    COCONUT trained with the same budget, evaluated side by side on held-out questions."""
    from . import quickstart as qs

    def invoke(argv):  # each step is a plain mlx-coconut command (recorded in quickstart.json)
        try:
            main.main(args=argv, prog_name="mlx-coconut", standalone_mode=False)
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        except click.ClickException as e:
            raise UserError(f"quickstart step `mlx-coconut {' '.join(argv)}`: {e.format_message()}")

    result = qs.run(out_dir, budget="small" if small else budget, seed=seed, force=force,
                    invoke=invoke, log=click.echo)
    click.echo(f"\n== generate --show-latents ({result['coconut']})")
    ctx.invoke(generate, model_path=result["coconut"], prompt=result["question"], show_latents=True,
               max_tokens=result["plan"].budget.max_tokens)
    click.echo(f"\n== the table in miniature\n{result['table']}")
    click.echo(f"\n== what this shows\n{result['interpretation']}")
    click.echo(f"\nquickstart finished in {result['seconds'] / 60:.1f} min; report: "
               f"{result['report']}; every step: {result['record']}")


@main.command()
def info():
    """Versions, the device MLX computes on, and which BLAS it uses with its speed (Linux)."""
    import platform
    from importlib.metadata import version

    import mlx.core as mx

    from . import blas

    click.echo(f"mlx-coconut {version('mlx-coconut')}, mlx {version('mlx')}, mlx-lm {version('mlx-lm')}, "
               f"python {platform.python_version()}, {platform.system()} {platform.machine()}")
    click.echo(f"device: {mx.default_device()}")
    if sys.platform == "linux":
        click.echo(f"BLAS: {blas.describe()}")
        click.echo(f"fp32 1024x1024x1024 matmul: {blas.matmul_gflops():.1f} GFLOP/s")


def entry():
    """The `mlx-coconut` console script (`import mlx_coconut` has already loaded a fast BLAS)."""
    main(prog_name="mlx-coconut")


# ---------------------------------------------------------------- fuse / serve
@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--out", required=True, metavar="DIR", help="Output model directory.")
@click.option("--dequantize", is_flag=True, help="Write full-precision weights (QLoRA / quantized bases).")
@click.option("--upload-repo", default=None, metavar="ORG/NAME", help="Also upload to the Hugging Face Hub.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@friendly_errors
def fuse(run_dir, out, dequantize, upload_repo, force):
    """A standalone model directory from a run: LoRA merged, latent tokens, settings, model card."""
    from . import fuse as fuse_lib

    if upload_repo:
        fuse_lib.check_repo_id(upload_repo)
    path = fuse_lib.fuse(run_dir, out, dequantize=dequantize, force=force, log=click.echo)
    if upload_repo:
        fuse_lib.upload(path, upload_repo, log=click.echo)


@main.command()
@click.option("--model", "model_path", required=True, metavar="DIR",
              help="A run directory, a fused model directory or a converted model directory.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0: any free port).")
@click.option("--max-tokens", type=int, default=256, show_default=True,
              help="Default max_tokens when a request gives none.")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Prompts generated together when requests queue up.")
@click.option("--chat-template", is_flag=True,
              help="Chat requests: render the conversation with the tokenizer's chat template "
                   "[default: the last user message, as the model was trained].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights (default: as stored; use float32 on a Linux CPU).")
@click.option("--api-key", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' (all routes but /health); use it beyond loopback.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="A browser Origin allowed to call the server (repeatable; '*': any) [default: none].")
@click.option("--quiet", is_flag=True, help="No per-request log lines.")
@friendly_errors
def serve(model_path, host, port, max_tokens, max_batch, chat_template, dtype, api_key, allow_origins, quiet):
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health."""
    import mlx.core as mx

    from . import api
    from .serve import close_server, exposure_warning, make_server

    if max_tokens < 1 or max_batch < 1 or not 0 <= port <= 65535:
        raise UserError("--max-tokens and --max-batch must be >= 1, --port in [0, 65535]")
    loaded = api.load(model_path, dtype=getattr(mx, dtype) if dtype else None)
    server = make_server(loaded, host, port, max_batch, max_tokens, chat_template, quiet=quiet,
                         api_key=api_key, allow_origins=allow_origins)
    warning = exposure_warning(host, api_key)
    if warning:
        click.echo(warning, err=True)
    s = loaded.settings
    click.echo(f"serving {model_path} ({s.mode}, stage {s.stage}, c={s.c_thought}) on "
               f"http://{host}:{server.server_address[1]}/v1 (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        close_server(server)


if __name__ == "__main__":
    entry()
