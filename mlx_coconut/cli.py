"""The `mlx-coconut` command line: a thin click layer over the library, one module per command
group in `commands/` (data, models, train, generate + serve, eval + plot + quickstart).

Every command turns an expected failure (a `UserError`, any OSError, a corrupt file) into one line on
stderr and exit code 2; a real bug keeps its traceback, followed by a line asking to report it
(`commands/common.py`).
"""

import click

from .commands import common  # noqa: F401  (first: it notes the process start)
from .commands.data import data
from .commands.evaluate import eval_cmd, plot, quickstart
from .commands.generate import generate, serve
from .commands.models import convert, fuse, info, latent_tokens
from .commands.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-coconut")
def main():
    """COCONUT (continuous latent reasoning) for Llama models in MLX."""


for command in (data, convert, latent_tokens, train, generate, eval_cmd, plot, quickstart, info, fuse, serve):
    main.add_command(command)


def entry():
    """The `mlx-coconut` console script (`import mlx_coconut` has already loaded a fast BLAS)."""
    main(prog_name="mlx-coconut")


if __name__ == "__main__":
    entry()
