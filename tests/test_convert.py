"""convert/ (GGUF + HF -> MLX), the `convert` CLI and the three COCONUT tokens, on real SmolLM2 weights."""

import json
import shutil
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_coconut.cli import main
from mlx_coconut.convert import convert, load_gguf, unpermute
from mlx_coconut.convert.gguf import gguf_tokenizer, llama3_rope_scaling
from mlx_coconut.tokens import INIT_TOKEN, add_latent_tokens
from tolerance import RTOL, rel_diff

PROMPT = "The capital of France is"
# A fixed Wikipedia-style paragraph (139 SmolLM2 tokens).
PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was "
    "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution. Although initially criticised by some of France's "
    "leading artists and intellectuals for its design, it has since become a global cultural "
    "icon of France and one of the most recognisable structures in the world.")
# Measured here (fp32, mlx-lm's Llama on our conversion): 7.28 with the q/k un-permute, 75.9 without.
# 10 leaves room for BLAS/platform noise and small tokenizer differences but is 7x below the bug.
PPL_MAX, PPL_BUG_MIN = 10.0, 30.0


def greedy(model, tokenizer, prompt=PROMPT, n=8):
    ids = tokenizer.encode(prompt)
    for _ in range(n):  # full recompute: works for any model with model(ids) -> logits
        ids.append(model(mx.array([ids]))[0, -1].argmax().item())
    return tokenizer.decode(ids)


def perplexity(model, tokenizer, text=PARAGRAPH):
    ids = mx.array([tokenizer.encode(text)])
    logits = model(ids[:, :-1]).astype(mx.float32)
    return mx.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean()).item()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    import mlx_lm

    return mlx_lm.load(str(smollm2_dir))


# ---------------------------------------------------------------- GGUF: real SmolLM2
def test_converted_dir_layout(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    expect = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
              "intermediate_size": 1536, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
              "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
              "eos_token_id": 2, "torch_dtype": "float32"}
    assert {k: config[k] for k in expect} == expect
    weights = mx.load(str(smollm2_dir / "model.safetensors"))
    assert "lm_head.weight" not in weights and len(weights) == 2 + 30 * 9
    assert all(v.dtype == mx.float32 for v in weights.values())


def test_tokenizer_loads_everywhere(smollm2_dir, smollm2):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    _, tok = smollm2
    text = "Natalia sold 48 clips <<48/2=24>> in May.\n#### 72<|im_end|>"
    assert hf.encode(text) == tok.encode(text)
    assert hf.decode(hf.encode(text)) == text
    assert tok.eos_token_id == 2 and hf.bos_token == "<|im_start|>"
    assert hf.convert_ids_to_tokens(hf.encode("2024")) == ["2", "0", "2", "4"]  # pre = smollm
    assert hf.encode("<<", add_special_tokens=False) == [33691]


def test_mlx_lm_greedy_says_paris(smollm2):
    model, tok = smollm2
    assert "Paris" in greedy(model, tok)


def test_perplexity_and_unpermute_matters(smollm2, smollm2_gguf_path):
    from mlx_lm.models.llama import Model, ModelArgs

    model, tok = smollm2
    good = perplexity(model, tok)
    assert good < PPL_MAX, good
    weights, config, _ = load_gguf(smollm2_gguf_path, unpermute_qk=False)
    bad_model = Model(ModelArgs.from_dict(config))
    bad_model.load_weights(list(weights.items()))
    bad = perplexity(bad_model, tok)
    assert bad > PPL_BUG_MIN and bad > 4 * good, (good, bad)


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert_hf_to_gguf.py: per head, rows (2, d/2) -> (d/2, 2)
    n_heads, head_dim, dim = 3, 8, 5
    w = np.arange(n_heads * head_dim * dim, dtype=np.float32).reshape(-1, dim)
    permuted = w.reshape(n_heads, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(np.array(unpermute(mx.array(permuted), n_heads)), w)


def test_llama3_rope_freqs_roundtrip():
    # what llama.cpp stores for Llama 3.1 8B (factor 8, theta 500000, head_dim 128) -> our config
    import math

    factors = []
    for i in range(0, 128, 2):
        wl = 2 * math.pi * 500000.0 ** (i / 128)
        if wl < 8192 / 4:
            factors.append(1.0)
        elif wl > 8192:
            factors.append(8.0)
        else:
            s = (8192 / wl - 1) / 3
            factors.append(1 / ((1 - s) / 8 + s))
    cfg = llama3_rope_scaling(mx.array(factors), 128, 500000.0)
    assert cfg == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama3_gguf_tokenizer_matches_hf(llama3_tokenizer_path):
    # Rebuild Llama 3's tokenizer from GGUF-style metadata (pre = llama-bpe) and compare with the real one.
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(llama3_tokenizer_path))
    spec = json.loads(llama3_tokenizer_path.read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": mx.array([3 if i >= 128000 else 1 for i in range(len(tokens))]),
          "tokenizer.ggml.bos_token_id": mx.array(128000), "tokenizer.ggml.eos_token_id": mx.array(128009),
          "tokenizer.ggml.add_bos_token": mx.array(True)}
    tok = gguf_tokenizer(md)
    text = ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes?\n"
            "<<600*30/100=180>>\n  indented  'll   don't ünïcödé 12345\n\n#### 180<|eot_id|>")
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode(text)[0] == 128000 and len(tok) == len(ref)  # 128256 + <|image|> in this file


# ---------------------------------------------------------------- HF directories
def tiny_hf_dir(path, smollm2_dir, tie=False):
    """A random Llama-3.1-shaped HF checkpoint (untied, GQA 4:1, llama3 rope) + SmolLM2's tokenizer."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 49152, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "tie_word_embeddings": tie, "torch_dtype": "bfloat16",
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    weights = {k: (v * 10 if k.endswith("embed_tokens.weight") else v).astype(mx.bfloat16)
               for k, v in weights.items()}
    if tie:  # HF checkpoints of tied models sometimes still carry lm_head
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones((8,))
    path.mkdir()
    half = len(weights) // 2  # two shards, like real checkpoints
    items = sorted(weights.items())
    mx.save_safetensors(str(path / "model-00001-of-00002.safetensors"), dict(items[:half]))
    mx.save_safetensors(str(path / "model-00002-of-00002.safetensors"), dict(items[half:]))
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(smollm2_dir / name, path / name)
    return weights


@pytest.mark.parametrize("tie", [False, True])
def test_hf_roundtrip(tmp_path, smollm2_dir, tie):
    import mlx_lm

    src = tmp_path / "hf"
    weights = tiny_hf_dir(src, smollm2_dir, tie=tie)
    out = convert(str(src), tmp_path / "mlx", log=lambda *_: None)  # keeps the checkpoint's bf16
    model, tok = mlx_lm.load(str(out))
    from mlx.utils import tree_flatten

    loaded = dict(tree_flatten(model.parameters()))
    expect = {k: v for k, v in weights.items() if "inv_freq" not in k}
    if tie:
        expect.pop("lm_head.weight")
    assert loaded.keys() == expect.keys()
    assert all(loaded[k].dtype == mx.bfloat16 and mx.array_equal(loaded[k], v) for k, v in expect.items())
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["tie_word_embeddings"] is tie
    assert tok.encode("hello world") == [28120, 905]


def test_quantized_conversion_loads(tmp_path, smollm2_dir):
    import mlx_lm

    src = tmp_path / "hf"
    tiny_hf_dir(src, smollm2_dir)
    res = CliRunner().invoke(main, ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "q8"),
                                    "--dtype", "float32", "-q", "--q-bits", "8", "--q-group-size", "64"])
    assert res.exit_code == 0, res.output
    assert "quantizing to 8 bits" in res.output and "done in" in res.output
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8}
    qmodel, _ = mlx_lm.load(str(tmp_path / "q8"))
    assert isinstance(qmodel.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(qmodel.lm_head, nn.QuantizedLinear)
    assert isinstance(qmodel.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    convert(str(src), tmp_path / "f32", dtype="float32", log=lambda *_: None)
    fmodel, _ = mlx_lm.load(str(tmp_path / "f32"))
    ids = mx.array([[1, 500, 28120, 905]])
    a, b = qmodel(ids), fmodel(ids)
    assert (mx.abs(a - b).max() / mx.abs(b).max()).item() < 0.05  # 8-bit is close to fp32


# ---------------------------------------------------------------- the three tokens
def _loaders():
    import mlx_lm

    loaders = [("mlx_lm", lambda p: mlx_lm.load(str(p)))]
    try:
        from mlx_lm.utils import load_tokenizer

        from mlx_coconut.model import load_model

        loaders.append(("ours", lambda p: (load_model(p)[0], load_tokenizer(p))))
    except ImportError:
        pass
    return loaders


@pytest.mark.parametrize("loader", [f for _, f in _loaders()], ids=[n for n, _ in _loaders()])
def test_latent_tokens_smollm2(smollm2_dir, loader):
    model, tok = loader(smollm2_dir)
    before = greedy(model, tok)
    src = tok.encode(INIT_TOKEN)
    assert len(src) == 1
    old = model.model.embed_tokens.weight
    ids = add_latent_tokens(model, tok)
    assert ids.ids == (49152, 49153, 49154)
    w = model.model.embed_tokens.weight
    assert w.shape == (49155, 576) and model.args.vocab_size == 49155
    assert mx.array_equal(w[:49152], old).item()
    assert all(mx.array_equal(w[i], w[src[0]]).item() for i in ids.ids)
    assert tok.encode("a<|start-latent|><|latent|><|latent|><|end-latent|>b")[1:-1] == [49152, 49153,
                                                                                      49153, 49154]
    assert greedy(model, tok) == before
    assert add_latent_tokens(model, tok) == ids and model.model.embed_tokens.weight.shape[0] == 49155


@pytest.mark.parametrize("quantized", [False, True])
def test_latent_tokens_untied_head(tmp_path, smollm2_dir, quantized):
    import mlx_lm

    src = tmp_path / "hf"
    tiny_hf_dir(src, smollm2_dir)
    convert(str(src), tmp_path / "mlx", dtype="float32", quantize=quantized, q_bits=8,
            log=lambda *_: None)
    model, tok = mlx_lm.load(str(tmp_path / "mlx"))
    prompt_ids = mx.array([tok.encode("hello world")])
    before = model(prompt_ids)
    ids = add_latent_tokens(model, tok)
    (src_id,) = tok.encode(INIT_TOKEN)
    for layer in (model.model.embed_tokens, model.lm_head):
        parts = [layer.weight] + ([layer.scales, layer.biases] if quantized else [])
        for p in parts:
            assert p.shape[0] == 49155
            assert all(mx.array_equal(p[i], p[src_id]).item() for i in ids.ids)
    after = model(prompt_ids)
    assert after.shape[-1] == 49155
    assert rel_diff(after[..., :49152], before) < RTOL
    # the new tokens' logits equal the `<<` logit (same head row)
    assert rel_diff(after[..., 49152:], mx.broadcast_to(after[..., src_id:src_id + 1], after[..., 49152:].shape)) < RTOL


def test_latent_tokens_cli(smollm2_dir):
    res = CliRunner().invoke(main, ["latent-tokens", "--model", str(smollm2_dir), "--max-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "49152 -> 49155" in res.output and "<|latent|>=49153" in res.output
    assert "(unchanged)" in res.output and "Paris" in res.output


def test_latent_tokens_cli_dtype(smollm2_dir):
    """--dtype casts as generate's does (the fast fp32 path of a bf16 / 4-bit model on a CPU)."""
    res = CliRunner().invoke(main, ["latent-tokens", "--model", str(smollm2_dir), "--max-tokens", "1",
                                    "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert "49152 -> 49155" in res.output


# ---------------------------------------------------------------- errors: exit 2, one line
def patched_gguf(path, arch="llama", ggml_type=None):
    """A tiny GGUF written by mx.save_gguf; optionally rewrite its tensor's type id in the header."""
    mx.save_gguf(str(path), {"token_embd.weight": mx.ones((4, 32))},
                 {"general.architecture": arch, "tokenizer.ggml.model": "gpt2"})
    if ggml_type is not None:
        data = bytearray(path.read_bytes())
        at = data.index(b"token_embd.weight") + len(b"token_embd.weight")
        (n_dims,) = struct.unpack_from("<I", data, at)
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, ggml_type)
        path.write_bytes(bytes(data))
    return path


def run_error(args):
    res = CliRunner().invoke(main, ["convert", *args])
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert res.exit_code == 2, res.output
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_convert_errors(tmp_path):
    out = ["--mlx-path", str(tmp_path / "out")]
    assert "no such directory" in run_error(["--hf-path", str(tmp_path / "missing"), *out])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in run_error(["--hf-path", str(tmp_path / "empty"), *out])
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    line = run_error(["--hf-path", str(gpt2), *out])
    assert "unsupported architecture" in line and "gpt2" in line
    line = run_error(["--hf-path", str(patched_gguf(tmp_path / "q6k.gguf", ggml_type=14)), *out])
    assert "Q6_K" in line and "token_embd.weight" in line
    line = run_error(["--hf-path", str(patched_gguf(tmp_path / "qwen.gguf", arch="qwen2")), *out])
    assert "unsupported GGUF architecture" in line and "qwen2" in line
    assert "no such GGUF file" in run_error(["--hf-path", str(tmp_path / "nope.gguf"), *out])
    assert not (tmp_path / "out").exists()


def test_refuses_overwrite_without_force(tmp_path, smollm2_dir):
    src = tmp_path / "hf"
    tiny_hf_dir(src, smollm2_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "already exists" in run_error(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").exists()
    res = CliRunner().invoke(main, ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"),
                                    "--force"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_hub_errors_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    def gated(*a, **k):
        err = GatedRepoError.__new__(GatedRepoError)  # its __init__ wants a live HTTP response
        raise err

    out = ["--mlx-path", str(tmp_path / "out")]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    line = run_error(["--hf-path", "meta-llama/Llama-3.1-8B-Instruct", *out])
    assert "gated" in line and "huggingface-cli login" in line and "licence" in line

    def offline(*a, **k):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert "cannot reach huggingface.co" in run_error(["--hf-path", "meta-llama/Llama-3.1-8B", *out])
