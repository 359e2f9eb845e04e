"""Measuring runs: `eval` (stages side by side), `plot` (training curves) and `quickstart` (the whole
job on an embedded default, each step a plain `mlx-coconut` command)."""

import sys

import click

from ..errors import UserError
from .common import friendly_errors


def _eval_progress(label, total):
    return click.progressbar(length=total, label=f"{label:<20}", file=sys.stderr, show_pos=True)


@click.command(name="eval")
@click.option("--model", "models", multiple=True, metavar="DIR",
              help="Model or run directory: RUN, RUN:best, RUN:latest (repeat to compare; the first "
              "is the baseline).")
@click.option("--results", "earlier", multiple=True, metavar="JSON",
              help="An earlier `eval --json` file on the same data: its models join the comparison "
              "without being evaluated again, ahead of any --model (repeat; the first is the baseline).")
@click.option("--data", "data_path", default=None, metavar="FILE",
              help="Test records (JSON/jsonl/iCoT); needed with --model.")
@click.option("--samples", type=int, default=None, help="Only the first N records [all].")
@click.option("--batch-size", type=int, default=None, help="Questions generated at once [32].")
@click.option("--max-tokens", type=int, default=None,
              help="New tokens per answer [as official: 64 when every answer is a number (GSM8k), else 128].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights (default: as stored; use float32 on a Linux CPU).")
@click.option("--thoughts", type=click.Choice(["own", "swapped", "none"]), default="own", show_default=True,
              help="What COCONUT models get at their thought columns: their own continuous thoughts, "
              "another question's (does the answer depend on them?), or none (the <|latent|> embedding).")
@click.option("--examples", "n_examples", type=int, default=3, show_default=True, help="Examples printed.")
@click.option("--report", default=None, metavar="MD", help="Write a markdown report.")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write all results as JSON.")
@friendly_errors
def eval_cmd(models, earlier, data_path, samples, batch_size, max_tokens, dtype, thoughts, n_examples,
             report, json_path):
    """Evaluate stages side by side: accuracy, tokens, time, CoT exact match, examples."""
    import mlx.core as mx

    from ..data import load_records
    from .. import report as rep

    if not models and not earlier:
        raise UserError("give --model (a model to evaluate) or --results (an earlier eval --json)")
    if models and not data_path:
        raise UserError("--data: needed to evaluate --model")
    if any(v is not None and v < 1 for v in (batch_size, max_tokens, samples)):
        raise UserError("--batch-size, --max-tokens and --samples must be >= 1")
    results, data_path, max_tokens = _earlier_results(earlier, data_path, max_tokens)
    if models:
        from ..evaluate import BATCH_SIZE
        batch_size = batch_size or BATCH_SIZE
        records = load_records(data_path)[:samples]
        if results and len(records) != results[0].results.n:
            raise UserError(f"--results {earlier[0]}: {results[0].results.n} questions, --data {data_path} "
                            f"gives {len(records)}")
        if max_tokens is None:
            from ..evaluate import default_max_tokens
            max_tokens = default_max_tokens(records)
        results += rep.compare(models, records, batch_size, max_tokens,
                               getattr(mx, dtype) if dtype else None, progress=_eval_progress, thoughts=thoughts)
    rep.disambiguate(results)  # two runs with the same settings, evaluated apart
    click.echo(rep.render_text(results, n_examples))
    rep.write_outputs(results, report, json_path, data_path, max_tokens)
    for path in (report, json_path):
        if path:
            click.echo(f"wrote {path}")


def _earlier_results(paths, data_path, max_tokens) -> tuple:
    """The models of earlier `eval --json` files → (results, data, max tokens), refused in one line
    when they were scored on other questions or with another budget than each other or the flags."""
    from .. import report as rep

    results = []
    for path in paths:
        these, data, tokens = rep.read_results(path)
        if data_path is not None and str(data) != str(data_path):
            raise UserError(f"--results {path}: scored on {data}, not {data_path}")
        if max_tokens is not None and tokens != max_tokens:
            raise UserError(f"--results {path}: generated at most {tokens} tokens, not {max_tokens}")
        if results and these and these[0].results.n != results[0].results.n:
            raise UserError(f"--results {path}: {these[0].results.n} questions, {paths[0]} has "
                            f"{results[0].results.n}")
        data_path, max_tokens = data, tokens
        results += these
    return results, data_path, max_tokens


@click.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option("--out", default="curves.png", show_default=True, help="Output image (.png, .pdf, .svg).")
@click.option("--results", default=None, metavar="JSON", help="An `eval --json` file: adds a panel of "
              "test accuracy against tokens per question.")
@friendly_errors
def plot(runs, out, results):
    """Training loss and validation accuracy over steps, per stage (needs matplotlib)."""
    from ..report import plot_runs

    click.echo(f"wrote {plot_runs(runs, out, results)}")


@click.command()
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Directory for weights, data, runs and the report [quickstart; quickstart-seedN "
              "with --seed N].")
@click.option("--budget", type=click.Choice(["default", "long", "small"]), default="default",
              show_default=True, help="default: CoT, no-CoT and COCONUT (17 min measured on a "
              "2-core CPU); long (50 min there): the paper's Table 1 in miniature, with the controls and the whole curriculum "
              "(reuses a default run's runs in the same --out); small: every row, tiny (the CI test).")
@click.option("--small", is_flag=True, help="Same as --budget small.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Another draw of the same task: new questions in every split, data order, init.")
@click.option("--force", is_flag=True, help="Retrain even if the runs in --out are complete.")
@click.option("--jobs", type=int, default=None, metavar="N",
              help="Training runs at once, as child processes sharing the BLAS threads (output in "
              "OUT/logs) [2 on a CPU with 2+ cores, 1 on a GPU].")
@click.pass_context
@friendly_errors
def quickstart(ctx, out_dir, budget, small, seed, force, jobs):
    """The main job on an embedded default: SmolLM2-135M + synthetic problems; CoT, no-CoT and
    COCONUT trained with the same budget, evaluated side by side on held-out questions."""
    from .. import quickstart as qs
    from .generate import generate

    def invoke(argv):  # each step is a plain mlx-coconut command (recorded in quickstart.json)
        try:
            ctx.find_root().command.main(args=argv, prog_name="mlx-coconut", standalone_mode=False)
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        except click.ClickException as e:
            raise UserError(f"quickstart step `mlx-coconut {' '.join(argv)}`: {e.format_message()}")

    result = qs.run(out_dir, budget="small" if small else budget, seed=seed, force=force,
                    invoke=invoke, log=click.echo, jobs=jobs)
    click.echo(f"\n== generate --show-latents ({result['coconut']})")
    ctx.invoke(generate, model_path=result["coconut"], prompt=result["question"], show_latents=True,
               max_tokens=result["plan"].budget.max_tokens)
    click.echo(f"\n== the table in miniature\n{result['table']}")
    click.echo(f"\n== what this shows\n{result['interpretation']}")
    click.echo(f"\nquickstart finished in {result['seconds'] / 60:.1f} min; report: "
               f"{result['report']}; every step: {result['record']}")
