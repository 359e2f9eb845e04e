"""The `mlx-coconut` command line: a thin click layer over the library.

Every command turns a `UserError` into one line on stderr and exit code 2 (no traceback).
"""

import functools
import sys

import click

from .errors import UserError


def friendly_errors(fn):
    """Print UserError (and common OS errors) as one line, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            click.echo(f"error: {e.strerror}: {e.filename}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-coconut")
def main():
    """COCONUT (continuous latent reasoning) for Llama models in MLX."""


# ---------------------------------------------------------------- data (issue 2)
@main.group()
def data():
    """Download, convert, synthesise and inspect {question, steps, answer} datasets."""


# ---------------------------------------------------------------- convert (issue 3)
@main.command()
def convert():
    """Convert HF / GGUF weights to MLX (not yet implemented)."""
    raise click.ClickException("not yet implemented")


# ---------------------------------------------------------------- train (issue 5)
@main.command()
def train():
    """Train stage 0 (CoT) or stage k (COCONUT) (not yet implemented)."""
    raise click.ClickException("not yet implemented")


# ---------------------------------------------------------------- generate (issue 4/6)
@main.command()
def generate():
    """Latent-then-text generation (not yet implemented)."""
    raise click.ClickException("not yet implemented")


# ---------------------------------------------------------------- eval (issue 6)
@main.command(name="eval")
def eval_cmd():
    """Evaluate stages side by side (not yet implemented)."""
    raise click.ClickException("not yet implemented")


if __name__ == "__main__":
    main()
