"""Latent-stage cost on real epochs: stage 0 (CoT), 1 and 2 (c=1) epochs as `mlx-coconut train` runs them.

Each epoch is set up by the product's own calls, the ones `training.train_stage` makes:
`Stage.start` of a `TrainConfig` (as `train` builds it from its flags: resolve and check),
`stage.load_data()` (the first --records GSM8k *train* records after the seeded shuffle, the same
records at every stage), `stage.load_model()` (LoRA as the configs/ Mac recipe: rank 16, scale 2, on
every projection, + the new-token rows; --full-weight for full fine-tuning), `stage.epoch_batches`
(length / latent-start grouping), `stage.step_fn()` (make_batch with --bucket, the compiled
`Stepper`), `stage.optimizer()` and `trainer.train_loop`; no run directory, no evaluation, no
checkpoints, one micro-batch per optimizer step. A step's time runs from the end of the previous step
to the end of its optimizer update (make_batch, trace/compile if new, fwd+bwd, update, evaluation).

Per stage: epoch seconds as a run's first epoch (a fresh `Stepper`: each new batch layout traces and
compiles), supervised tokens (labels != -100), computed
columns (sum of B x T over the micro-batches, padding included) and real columns (non-pad tokens,
thoughts included), seconds per supervised token and per computed column, distinct compiled traces,
and the ratios to stage 0 (median over rounds of the per-round ratio; rounds alternate the stage order).
The per-token rates and ratios come from a second pass over the same batches with every trace
compiled (the steady state of a long run); the first pass gives the epoch time with its compiles.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_epochs.py
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (first: it loads the fast BLAS)
import mlx.core as mx  # noqa: E402

GOAL = 1.15


def epoch_runner(path, data, stage, args, tmp):
    """A callable timing one fresh epoch at `stage` → its measurements (dict of floats)."""
    from mlx_coconut.data import make_batch
    from mlx_coconut.trainer import Callbacks, train_loop
    from mlx_coconut.training import Stage, TrainConfig, disable_grad_checkpoint

    def quiet(*_, **__):
        pass

    def run():
        config = TrainConfig(
            model=str(path), out=str(Path(tmp) / f"stage{stage}"), train=str(data), samples=args.records,
            stage=stage, c_thought=args.c_thought, max_latent_stage=3, pad_latent_to_max=True, epochs=1,
            batch_size=args.batch_size, bucket=args.bucket, eval_samples=0, save_every=0,
            max_seq_length=args.max_seq_length, seed=args.seed, lora=not args.full_weight,
            lora_rank=args.lora_rank, lora_scale=args.lora_scale, grad_checkpoint=args.grad_checkpoint)
        st = Stage.start(config, quiet)
        st.load_data()
        st.load_model()
        cfg, model, special = st.cfg, st.model, st.special
        batches = st.epoch_batches(0)
        step_fn = st.step_fn()
        shapes = []  # per micro-batch: (B x T, real tokens, supervised, compiled a new trace)

        def measured_step(examples, epoch, bi):
            b = make_batch(examples, special.eos, special.latent, cfg.bucket)
            seen = len(step_fn.stepper.layouts)
            out = step_fn(examples, epoch, bi)
            passes = int(b["latent_mask"].any(axis=0).sum()) + 1
            shapes.append((b["input_ids"].size, b["ntokens"], out[2], len(step_fn.stepper.layouts) > seen,
                           passes))
            return out

        class Timer(Callbacks):
            def begin_epoch(self, epoch, first, optimizer):
                self.t, self.times = time.perf_counter(), []
                return optimizer

            def after_step(self, report, stop):
                now = time.perf_counter()
                self.times.append(now - self.t)
                self.t = now
                return False

        cold = Timer()
        train_loop(model, st.optimizer(), [(0, batches, 0)], measured_step, cold)
        warm = None
        if not args.no_warm:  # the same batches again, every trace compiled: the steady state
            warm, n = Timer(), len(shapes)
            train_loop(model, st.optimizer(), [(0, batches, 0)], measured_step, warm)
            del shapes[n:]
        if cfg.grad_checkpoint:
            disable_grad_checkpoint(model)
        del model, st
        mx.clear_cache()
        return summarize(cold.times, warm.times if warm else None, shapes)
    return run


def summarize(cold, warm, shapes) -> dict:
    """Per-token rates over the warm pass, else over the cold steps that compiled nothing."""
    cols, real, sup, new, passes = (list(x) for x in zip(*shapes))
    if warm is not None:
        keep, times = list(range(len(warm))), warm
    else:
        keep = [i for i in range(len(cold)) if not new[i]] or list(range(len(cold)))
        times = cold
    kt = sum(times[i] for i in keep)
    out = {"epoch_s": sum(cold), "epoch_ms_per_sup": 1e3 * sum(cold) / sum(sup), "steps": len(cold), "traces": sum(new), "supervised": sum(sup),
           "columns": sum(cols), "real": sum(real), "passes": sum(passes) / len(passes),
           "ms_per_sup": 1e3 * kt / sum(sup[i] for i in keep),
           "ms_per_col": 1e3 * kt / sum(cols[i] for i in keep),
           "ms_per_real": 1e3 * kt / sum(real[i] for i in keep)}
    if warm is not None:  # what each new trace added to its step
        out["warm_s"] = sum(warm)
        out["compile_s"] = sum(cold[i] - warm[i] for i in range(len(cold)) if new[i]) / max(sum(new), 1)
    return out


def count_layouts(path, data, stages, args) -> dict:
    """Distinct compiled traces (`training.trace_key`: batch shape, labelled positions, latent layout) one epoch over `data` would use at each
    stage, counted on the host from the same pieces (no training)."""
    from mlx_coconut.checkpoint import load_tokenizer
    from mlx_coconut.data import add_latent_special_ids, make_batch
    from mlx_coconut.training import Stage, TrainConfig, trace_key

    tokenizer = load_tokenizer(path)
    special = add_latent_special_ids(tokenizer)
    out = {}
    for stage in stages:
        st = Stage.start(TrainConfig(
            model=str(path), out="unused", train=str(data), stage=stage, c_thought=args.c_thought,
            max_latent_stage=3, pad_latent_to_max=True, batch_size=args.batch_size, bucket=args.bucket,
            max_seq_length=args.max_seq_length, seed=args.seed, eval_samples=0), lambda *_: None)
        st.load_data()
        st.tokenizer, st.special = tokenizer, special  # host-side only: no model is loaded
        batches = [make_batch(b, special.eos, special.latent, st.cfg.bucket) for b in st.epoch_batches(0)]
        out[stage] = {"batches": len(batches), "records": len(st.records),
                      "traces": len({trace_key(b) for b in batches}),
                      "columns": sum(b["input_ids"].size for b in batches),
                      "real": sum(b["ntokens"] for b in batches),
                      "supervised": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)}
    return out


def main(argv=None):
    p = bc.parser(__doc__.splitlines()[0], repeats=2)
    p.add_argument("--records", type=int, default=24, help="GSM8k train records per epoch (24: one "
                   "round of the three stages, cold and warm pass, takes ~5 min on a 2-core CPU)")
    p.add_argument("--data", default=None, help="training records (default: ../shared/data/gsm8k/"
                   "gsm8k_train.jsonl, read in place)")
    p.add_argument("--stages", default="0,1,2", help="stages to time (stage 0 first: the ratios' base)")
    p.add_argument("--c-thought", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bucket", type=int, default=32, help="train --bucket")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-weight", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-scale", type=float, default=2.0)
    p.add_argument("--grad-checkpoint", action="store_true", help="train --grad-checkpoint (the Mac "
                   "recipe uses it for memory; off here: a 135M model needs none)")
    p.add_argument("--no-warm", action="store_true",
                   help="skip the second (warm) pass over each epoch's batches; rates then come from "
                   "the first pass's steps that compiled nothing")
    p.add_argument("--count-layouts", action="store_true",
                   help="also count the distinct compiled traces a whole epoch of --data would use "
                   "at each stage (host-side, no training)")
    args = p.parse_args(argv)
    stages = [int(s) for s in args.stages.split(",")]
    if stages[0] != 0:
        raise SystemExit("--stages: start with 0 (the base of the ratios)")

    path = bc.resolve_model(args.model)
    data = Path(args.data) if args.data else bc.SHARED_DATA / "gsm8k" / "gsm8k_train.jsonl"
    if not data.exists():
        raise SystemExit(f"{data} not found (the shared GSM8k data sits beside the checkout)")
    bc.header("bench_epochs: whole training epochs at stage 0 / 1 / 2, as `mlx-coconut train` runs them")
    what = "full weights" if args.full_weight else f"LoRA rank {args.lora_rank} scale {args.lora_scale:g}"
    print(f"model: {path}; {args.records} records of {data.name}; batch {args.batch_size}, bucket "
          f"{args.bucket}, c={args.c_thought}, {what}{', grad checkpoint' if args.grad_checkpoint else ''}; "
          f"rates over {'the steps without a new trace' if args.no_warm else 'a second, warm pass'}")
    tmp = tempfile.TemporaryDirectory()
    names = {s: f"stage {s}" for s in stages}
    runs = bc.alternate({names[s]: epoch_runner(path, data, s, args, tmp.name) for s in stages},
                        args.repeats, warmup=False)
    tmp.cleanup()

    base = runs[names[0]]
    print(f"per epoch (median of {args.repeats} rounds): 'first' = the epoch with its compiles (as a "
          f"run's first epoch), 'warm' = the same batches again, every trace compiled; 'compile' = what "
          f"a new trace added to its step; ms per supervised token / computed column / real column "
          f"over {'the first pass without compiling steps' if args.no_warm else 'the warm pass'}")
    print(f"  {'stage':8s} {'first s':>7s} {'warm s':>7s} {'steps':>5s} {'traces':>6s} {'compile':>7s} "
          f"{'passes':>6s} {'sup tok':>7s} {'columns':>7s} {'real':>6s} {'pad %':>5s} {'ms/sup':>7s} "
          f"{'ms/col':>7s} {'ms/real':>7s}")
    for s in stages:
        r = runs[names[s]]
        m = {k: bc.median(r, k) for k in r[0]}
        print(f"  {names[s]:8s} {m['epoch_s']:7.1f} {m.get('warm_s', float('nan')):7.1f} "
              f"{m['steps']:5.0f} {m['traces']:6.0f} {m.get('compile_s', float('nan')):7.2f} "
              f"{m['passes']:6.2f} {m['supervised']:7.0f} {m['columns']:7.0f} {m['real']:6.0f} "
              f"{100 * (1 - m['real'] / m['columns']):5.1f} {m['ms_per_sup']:7.2f} "
              f"{m['ms_per_col']:7.3f} {m['ms_per_real']:7.3f}")
    result = {}
    for s in stages[1:]:
        r = runs[names[s]]
        sup = bc.paired_ratio(r, base, "ms_per_sup")
        col = bc.paired_ratio(r, base, "ms_per_col")
        real = bc.paired_ratio(r, base, "ms_per_real")
        epoch = bc.paired_ratio(r, base, "epoch_s")
        first = bc.paired_ratio(r, base, "epoch_ms_per_sup")
        result[s] = sup
        print(f"RATIO stage {s}/stage 0 per supervised token = {sup:.3f}"
              + (f" (goal <= {GOAL}: {bc.verdict(sup <= GOAL)})" if s == 1 else "")
              + f"; per computed column {col:.3f}; per real column {real:.3f}; epoch time {epoch:.3f}; "
              f"first epoch (compiles included) per supervised token {first:.3f}")
    if args.count_layouts:
        from mlx_coconut.training import Stepper
        print(f"one epoch over all of {data.name}, counted on the host (no training): distinct compiled "
              f"traces (the Stepper compiles the first {Stepper.MAX_TRACES}, later layouts run eagerly), columns, "
              f"padding; "
              f"'est. x' = the measured per-column ratio x the counted columns per supervised token:")
        counts = count_layouts(path, data, stages, args)
        c0 = counts[stages[0]]
        for s, c in counts.items():
            rc = (c["columns"] / c["supervised"]) / (c0["columns"] / c0["supervised"])
            est = f"; est. x{rc * bc.paired_ratio(runs[names[s]], base, 'ms_per_col'):.3f} per supervised token" \
                if s != stages[0] else ""
            print(f"  stage {s}: {c['traces']} traces for {c['batches']} micro-batches ({c['records']} "
                  f"records); {c['columns']} columns, {c['real']} real ({100 * (1 - c['real'] / c['columns']):.1f}% "
                  f"padding), {c['supervised']} supervised; columns per supervised token x{rc:.3f} stage 0's{est}")
    return {"ratio": result.get(1, result.get(stages[-1])), "ratios": result}


if __name__ == "__main__":
    main()
