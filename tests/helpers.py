"""Builders shared by the test files: tiny random Llamas (in memory or as model directories), a BPE
tokenizer trained on the records, and the training config the tiny runs use."""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_coconut import training as train
from mlx_coconut.data import save_records, synth_records
from mlx_coconut.model import Model, ModelArgs

# The base of every tiny test model; each test overrides what it needs (width, vocabulary, rope).
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=101, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=2048)
# Shaped like Llama 3.1 (llama3 rope scaling, untied, GQA 4:1), only tiny. The small
# original_max_position_embeddings puts the scaled and the interpolated band inside head_dim.
LLAMA31_TINY = dict(
    model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=160,
    num_attention_heads=8, num_key_value_heads=2, vocab_size=101, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=4096,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64),
)


def tiny_config(**overrides) -> dict:
    return dict(TINY, **overrides)


def random_model(seed=0, **overrides) -> Model:
    """A tiny random Llama (TINY + overrides), deterministic for `seed`."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(tiny_config(**overrides)))
    mx.eval(model.parameters())
    return model


def write_model_dir(path: Path, seed=0, **overrides) -> Model:
    """`random_model` saved as a model directory (config.json + model.safetensors, no tokenizer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = random_model(seed, **overrides)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(tiny_config(**overrides)))
    return model


def model_dir_with_tokenizer(path: Path, tokenizer_src, settings=None) -> Path:
    """A random 2-layer, 32-wide Llama with a real tokenizer (+ the 3 latent tokens) and, if given,
    a coconut.json holding `settings`."""
    from mlx_lm.tokenizer_utils import load as load_tok

    from mlx_coconut.data import add_latent_special_ids

    path.mkdir(parents=True)
    tok = load_tok(tokenizer_src)
    add_latent_special_ids(tok._tokenizer)  # adds the latent tokens to the tokenizer
    write_model_dir(path, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                    vocab_size=len(tok._tokenizer), tie_word_embeddings=True, max_position_embeddings=512)
    tok._tokenizer.save_pretrained(str(path))
    if settings:
        (path / "coconut.json").write_text(json.dumps({"settings": settings}))
    return path


def make_tokenizer(path: Path, records) -> int:
    """A byte-level BPE trained on the records themselves: exact round trip, ~35 tokens per record
    (numbers and words mostly single tokens, `<<` one token — the latent tokens copy its rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, min_frequency=1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([r.question + "\n" + "".join(s + "\n" for s in r.steps) + "### " + r.answer
                             for r in records], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(path))
    return tok.get_vocab_size()


def make_tiny_model(path: Path, records, hidden=64, layers=2, tie=False, seed=0) -> Path:
    """A trainable model directory: the BPE tokenizer of `records` + a random Llama of that vocabulary."""
    path.mkdir(parents=True, exist_ok=True)
    write_model_dir(path, seed, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                    vocab_size=make_tokenizer(path, records), tie_word_embeddings=tie)
    return path


def tiny_setup(root: Path, seed=0, tied=False) -> dict:
    """16 synthetic records (train.json) and a tiny model trained-tokenizer directory under `root`."""
    records = synth_records(16, seed=seed, min_steps=1, max_steps=2)
    data = root / "train.json"
    save_records(records, data)
    setup = {"root": root, "model": make_tiny_model(root / "model", records), "data": data}
    if tied:
        setup["tied"] = make_tiny_model(root / "tied", records, tie=True)
    return setup


def cfg(tiny, out, **kw) -> train.TrainConfig:
    base = dict(model=str(tiny["model"]), out=str(out), train=str(tiny["data"]), eval_samples=0,
                batch_size=8, learning_rate=2e-3, save_every=0, seed=0)
    base.update(kw)
    return train.TrainConfig(**base)


def quiet(*_):
    pass


class FakeResponse:
    """What urllib.request.urlopen returns, serving `body` (tests replace the network with it)."""

    def __init__(self, body: bytes):
        self.body, self.headers = body, {"Content-Length": str(len(body))}

    def read(self, n):
        chunk, self.body = self.body[:n], self.body[n:]
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


def run_cli(args):
    """`mlx-coconut ARGS` in-process (click's test runner)."""
    from click.testing import CliRunner

    from mlx_coconut.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res, *needles):
    """Exit code 2 and a single `error: ...` line containing every needle, no traceback."""
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]
