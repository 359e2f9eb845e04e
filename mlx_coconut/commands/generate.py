"""Using a trained model: `generate` (latent-then-text, streamed) and `serve` (the OpenAI-compatible
HTTP server)."""

import sys

import click

from ..errors import UserError
from .common import friendly_errors


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


@click.command()
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

    from .. import api

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


@click.command()
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

    from .. import api
    from ..serve import close_server, exposure_warning, make_server

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
