"""`mlx-coconut data`: download, convert, synthesise and inspect {question, steps, answer} datasets."""

import sys

import click

from ..errors import UserError
from .common import friendly_errors


@click.group()
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
    from .. import data as D

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
    from ..data import load_records, save_records, step_distribution

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
@click.option("--task", type=click.Choice(["words", "chain"]), default="words", show_default=True,
              help="words: arithmetic word problems; chain: follow --min/--max-steps links through a "
                   "shuffled cycle of --nodes words (serial steps: each needs the previous one's result).")
@click.option("--nodes", type=int, default=6, show_default=True, help="chain: words in the cycle.")
@click.option("--exclude", "exclude_files", multiple=True, metavar="FILE",
              help="Skip questions found in these record files (repeatable): a held-out split.")
@friendly_errors
def synth(n, seed, out, min_steps, max_steps, ops, max_value, style, task, nodes, exclude_files):
    """Synthetic problems with steps: word problems with calculator steps (<<a*b=c>>) and integer
    answers, or pointer chasing (--task chain)."""
    from ..data import chain_records, load_records, save_records, step_distribution, synth_records

    exclude = {r.question for f in exclude_files for r in load_records(f)}
    if task == "chain":
        records = chain_records(n, seed, min_steps, max_steps, nodes, exclude=exclude)
    else:
        records = synth_records(n, seed, min_steps, max_steps, exclude=exclude,
                                ops=[o.strip() for o in ops.split(",") if o.strip()], max_value=max_value,
                                style=style)
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
    from ..checkpoint import load_tokenizer
    from ..data import MAX_C_THOUGHT, load_records, stats_report
    from ..errors import UserError

    if not 1 <= c_thought <= MAX_C_THOUGHT:
        raise UserError(f"--c-thought must be between 1 and {MAX_C_THOUGHT} (got {c_thought})")
    records = load_records(path, fmt)
    tokenizer = load_tokenizer(model_dir) if model_dir else None
    click.echo(stats_report(records, tokenizer, c_thought=c_thought, index=index))
