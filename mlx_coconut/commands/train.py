"""`mlx-coconut train`: its flags built from the `TrainConfig` fields (options.py), the config from
`options.from_flags`, the run from `training.run`."""

import sys

import click

from ..errors import UserError
from .common import friendly_errors, process_start


def _train_options(fn):
    """The `train` flags, built from the TrainConfig fields (one declaration: name, type, help,
    default). Every flag defaults to None so -c/--config YAML and an --init run can fill it."""
    import typing
    from dataclasses import fields

    from ..options import TrainConfig, help_text

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


@click.command()
@_train_options
@friendly_errors
def train(config_file, train_file, **flags):
    """Train stage 0 (CoT) or stage k (COCONUT): full fine-tune, --lora or QLoRA (--lora -q 4).

    \b
    mlx-coconut train --stage 0 --model weights/llama-3.1-8b --train data/gsm8k/train.json \\
        --valid data/gsm8k/valid.json --samples 10000 --epochs 3 --batch-size 8 --out runs/stage0
    mlx-coconut train --stage 1 --c-thought 1 --init runs/stage0 --out runs/stage1
    """
    from .. import training
    from ..options import from_flags

    config = from_flags({**flags, "train": train_file}, config_file)
    try:
        result = training.run(config, started=process_start())
    except KeyboardInterrupt:
        raise UserError("interrupted") from None
    if result.get("interrupted"):
        sys.exit(130)  # saved; the conventional exit status of a Ctrl-C'd command
