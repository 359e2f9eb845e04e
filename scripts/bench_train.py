"""Stage-0 LoRA training speed: our training step vs mlx-lm's LoRA trainer, same model, batch, lengths.

Both sides get the same base weights, the same LoRA (mlx-lm's `linear_to_lora_layers` on every
projection of every block, rank --rank, scale 20, no dropout), AdamW (lr 1e-4, wd 0.01), and the same
--batch-size GSM8k training examples formatted by the product at stage 0 (CoT: question masked, steps
and answer supervised), no gradient checkpointing.

- ours:   `mlx_coconut.training.Stepper` (compiled stage-0 loss+grad over `coconut.loss_fn`, the head
          on the labelled positions only) + `trainer.make_update` (the compiled optimizer update) +
          eval, as `train.train_stage` runs it, after the product's `tokens.add_latent_tokens` +
          `adapters.apply_lora`;
- mlx-lm: `mlx_lm.tuner.trainer.train(...)` on the same token sequences (prompt offsets = question
          length), its own compiled step; its per-iteration time is read from its report callback.

Each repeat runs 2 optimizer steps per side (alternating sides) and times the second (the first
compiles). Tokens/s = non-pad input tokens of the batch / step time, identical count on both sides.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_train.py
"""

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (first: it loads the fast BLAS)
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

GOAL = 1.05


def main(argv=None):
    p = bc.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--skip", type=int, default=0, help="start at this GSM8k record")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per side per repeat "
                   "(the last is timed)")
    p.add_argument("--no-eager", action="store_true",
                   help="skip the third side (ours without mx.compile)")
    args = p.parse_args(argv)

    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train as lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as lm_load_model

    from mlx_coconut import adapters
    from mlx_coconut.checkpoint import load_tokenizer
    from mlx_coconut.data import FormatConfig, format_record, add_latent_special_ids
    from mlx_coconut.model import load_model
    from mlx_coconut.tokens import add_latent_tokens
    from mlx_coconut.data import make_batch
    from mlx_coconut.training import Stepper
    from mlx_coconut.trainer import make_update

    path = bc.resolve_model(args.model)
    bc.header("bench_train: stage-0 LoRA step, ours vs mlx-lm tuner")
    lora = {"rank": args.rank, "scale": 20.0, "dropout": 0.0, "layers": 0, "quantization": None}

    # ours: the product's set-up (train.setup_model) and step (train.Stepper + optimizer.update)
    ours, _ = load_model(path)
    tokenizer = load_tokenizer(path)
    new_ids = add_latent_tokens(ours, tokenizer).ids
    adapters.apply_lora(ours, lora, new_ids)
    mx.eval(ours.parameters())
    ids = add_latent_special_ids(tokenizer)
    records = bc.read_gsm8k(args.skip + args.batch_size, split="test")[args.skip:]
    examples = [format_record(r, tokenizer, FormatConfig(mode="cot"), ids) for r in records]
    batch = make_batch(examples, ids.eos, ids.latent, bucket=32)
    n_tokens = batch["ntokens"]
    ours.train()
    stepper = Stepper(ours, feedback=True, use_compile=True)
    opt_ours = optim.AdamW(learning_rate=1e-4, weight_decay=0.01)
    opt_ours.init(ours.trainable_parameters())
    update = make_update(ours, opt_ours, use_compile=True)
    # the same model and optimizer, stepped without mx.compile (train --no-compile / compile: false)
    stepper_eager = Stepper(ours, feedback=True, use_compile=False)
    update_eager = make_update(ours, opt_ours, use_compile=False)

    # mlx-lm: its model class, same weights, its LoRA conversion and trainer
    peer, _ = lm_load_model(path)
    peer.freeze()
    linear_to_lora_layers(peer, len(peer.model.layers), {k: lora[k] for k in ("rank", "scale", "dropout")})
    mx.eval(peer.parameters())
    dataset = [(e.input_ids, sum(1 for l in e.labels if l == -100)) for e in examples]
    opt_peer = optim.AdamW(learning_rate=1e-4, weight_decay=0.01)
    tmp = tempfile.TemporaryDirectory()

    def n_trainable(m):
        from mlx.utils import tree_flatten
        return sum(v.size for _, v in tree_flatten(m.trainable_parameters()))

    print(f"model: {path}; batch {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]} "
          f"(ours, padded to 32) with {n_tokens} non-pad tokens, "
          f"{int((batch['labels'] != -100).sum())} supervised; LoRA rank {args.rank} on all "
          f"projections: trainable ours {n_trainable(ours) / 1e6:.2f}M (+ 3 latent-token rows), "
          f"mlx-lm {n_trainable(peer) / 1e6:.2f}M")

    def ours_fn(step_fn=stepper, update_fn=update):
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            loss, ntoks, grads = step_fn(batch)
            update_fn(grads, 1.0)
            mx.eval(loss, ours.trainable_parameters(), opt_ours.state)
            times.append(time.perf_counter() - t)
        return {"step_s": times[-1], "tok_s": n_tokens / times[-1], "loss": loss.item()}

    class Cb(TrainingCallback):
        def __init__(self):
            self.reports = []

        def on_train_loss_report(self, info):
            self.reports.append(info)

    def peer_fn():
        cb = Cb()
        targs = TrainingArgs(batch_size=args.batch_size, iters=args.steps, steps_per_report=1,
                             steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=4096,
                             adapter_file=str(Path(tmp.name) / "adapters.safetensors"))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            lm_train(peer, opt_peer, dataset, None, args=targs, training_callback=cb)
        last = cb.reports[-1]
        step_s = 1.0 / last["iterations_per_second"]
        return {"step_s": step_s, "tok_s": n_tokens / step_s, "loss": last["train_loss"]}

    sides = {"ours": ours_fn, "mlx-lm": peer_fn}
    if not args.no_eager:
        sides["ours, no compile"] = lambda: ours_fn(stepper_eager, update_eager)
    runs = bc.alternate(sides, args.repeats, warmup=False)
    o, pr = bc.median(runs["ours"], "tok_s"), bc.median(runs["mlx-lm"], "tok_s")
    ratio = bc.paired_ratio(runs["ours"], runs["mlx-lm"], "tok_s")
    print(f"training tokens/s (median of {args.repeats}): ours {o:.1f} "
          f"({bc.median(runs['ours'], 'step_s'):.2f} s/step), mlx-lm {pr:.1f} "
          f"({bc.median(runs['mlx-lm'], 'step_s'):.2f} s/step)")
    print(f"RATIO ours/mlx-lm training tokens/s = {ratio:.3f} (median of per-round ratios; ratio of "
          f"medians {o / pr:.3f}) (goal >= {GOAL}: {bc.verdict(ratio >= GOAL)})")
    if "ours, no compile" in runs:
        e = bc.median(runs["ours, no compile"], "tok_s")
        re = bc.paired_ratio(runs["ours, no compile"], runs["mlx-lm"], "tok_s")
        print(f"  (ours without mx.compile: {e:.1f} tokens/s, {re:.3f}x mlx-lm; product default is "
              f"compile on)")
    tmp.cleanup()
    return {"ratio": ratio}


if __name__ == "__main__":
    main()
