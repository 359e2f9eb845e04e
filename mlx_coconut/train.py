"""Training: stage 0 (CoT) and stage k (COCONUT), full fine-tune, LoRA or QLoRA, resumable runs.

One stage = the official `run.py` inner loop for a fixed scheduled stage: the records are formatted
for that stage (k·c thoughts replace the first k steps), shuffled per epoch with a seeded order,
collated with the official left padding, and trained with AdamW on `coconut.loss_fn` (the one latent
loop). A curriculum (`stages="0-3"`) runs consecutive stages, each from the previous one's weights with
a fresh optimizer (official `reset_optimizer`), each in its own run directory `OUT/stageK`.

Here: resolving the options (`options.py` declares them), setting the model up, the formatted and
length-grouped epochs, the step function, and `StageCallbacks` (metrics, progress bar, checkpoints,
Ctrl-C, epoch evaluation, best checkpoint) with `RunDir` (the run directory's lock, metrics and
checkpoints) around the generic loop of `trainer.py`. `_train_stage` wires one stage together.
"""

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from . import adapters, checkpoint as ckpt
from . import distributed
from .coconut import collated_loss, loss_fn, supervised_rows
from .data import MAX_C_THOUGHT, FormatConfig, MODES, SpecialIds, format_record, load_records, make_batch
from .errors import UserError
from .evaluate import BATCH_SIZE as EVAL_BATCH_SIZE, evaluate, evaluate_sharded
from .optimizer import make_optimizer, run_dtypes, set_optimizer_state, without_masters
from .options import (DEFAULTS, DTYPES, INHERITED, RESET_CHOICES, TrainConfig,  # noqa: F401 (re-exported)
                      config_from_dict)
from .trainer import Callbacks, StepReport, train_loop

POOL_BATCHES = 16  # latent stages: batches grouped by latent start within pools of this many


# ---------------------------------------------------------------- entry point


def run(config: TrainConfig, log=print, started: Optional[float] = None) -> dict:
    """Train one stage, or a curriculum of stages (`config.stages`). Returns a summary dict.
    `started`: the `time.perf_counter()` of the process start (the CLI's), so that the first
    stage's "first step done" line counts the imports; None counts from the stage's start."""
    if not distributed.setup().main:
        log = _quiet  # under `mlx.launch` rank 0 alone prints
    if config.stages:
        return run_curriculum(config, log, started)
    return train_stage(config, log, started)


def parse_stages(text: str) -> list:
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            stages = list(range(int(a), int(b) + 1))
        else:
            stages = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--stages {text!r}: expected a range like 0-3 or a list like 0,1,2") from None
    if not stages or min(stages) < 0:
        raise UserError(f"--stages {text!r}: expected non-negative stages")
    return stages


def run_curriculum(config: TrainConfig, log=print, started: Optional[float] = None) -> dict:
    """Official schedule: stage s for `epochs_per_stage` epochs, optimizer reset at each stage.
    With both `epochs_per_stage` and `epochs` (the official `num_epochs`: the whole schedule), the
    last stage runs the remaining epochs, as the official loop keeps going at its final stage."""
    stages = parse_stages(config.stages)
    if not config.out:
        raise UserError("--out is required (the run directory)")
    per_stage = [config.epochs_per_stage or config.epochs] * len(stages)
    if config.epochs_per_stage and config.epochs:
        per_stage[-1] = config.epochs - config.epochs_per_stage * (len(stages) - 1)
        if per_stage[-1] < 1:
            raise UserError(f"--epochs {config.epochs} leaves no epoch for stage {stages[-1]} after "
                            f"{len(stages) - 1} stages of --epochs-per-stage {config.epochs_per_stage}")
    root = Path(config.out)
    prev, results = None, {}
    for s, epochs in zip(stages, per_stage):
        out = root / f"stage{s}"
        cfg = TrainConfig(**{**asdict(config), "stages": None, "stage": s, "out": str(out),
                             "epochs": epochs})
        if s != stages[0]:
            cfg.model, cfg.init = None, f"{prev}:latest"  # one continuous run, as official
            cfg.mode = None if config.mode in (None, "cot") else config.mode
        run_state = _run_state(out)
        if run_state and run_state.get("complete"):
            log(f"stage {s}: already complete in {out}")
        else:
            cfg.resume = bool(run_state) and config.resume
            log(f"=== stage {s} -> {out}")
            results[s] = train_stage(cfg, log, started)
            started = None  # later stages count from their own start
        prev = out
    return {"stages": results, "out": str(root)}


def _run_state(out: Path) -> Optional[dict]:
    try:
        return ckpt.load_optimizer_state(out)[1] if ckpt.is_run_dir(out) else None
    except (UserError, OSError):
        return None


# ---------------------------------------------------------------- config resolution


def resolve(config: TrainConfig) -> tuple:
    """Fill unset fields from the --init run, then defaults; validate. → (config, init run or None)."""
    if not config.out:
        raise UserError("--out is required (the run directory)")
    init_run = None
    if config.init:
        p = ckpt.split_ref(config.init)[0]
        if not p.is_dir():
            raise UserError(f"--init {config.init}: no such directory")
        init_run = ckpt.read_run(p)
        if init_run is None:
            raise UserError(f"--init {config.init}: not a run directory (no {ckpt.RUN_FILE} with a "
                            f"checkpoint); use --model for a plain model directory")
        if config.model:
            raise UserError("give either --model or --init, not both")
    elif not config.model:
        raise UserError("give --model (a model directory) or --init (a previous run directory)")
    values = asdict(config)
    inherited = (init_run or {}).get("config", {})
    for k in INHERITED:
        if values[k] is None and k in inherited:
            values[k] = inherited[k]
    for k, v in DEFAULTS.items():
        if values[k] is None:
            values[k] = v
    cfg = TrainConfig(**values)
    if init_run and init_run.get("weights") == "lora" and cfg.lora:
        _check_lora_init(cfg, init_run["lora"], config.init)
    if cfg.mode is None:
        cfg.mode = "cot" if cfg.stage == 0 else "coconut"
    cfg.reset_optimizer = reset_cadence(cfg)
    if cfg.dtype is None:
        cfg.dtype = "bfloat16" if mx.default_device() == mx.gpu else "float32"
    validate(cfg)
    return cfg, init_run


def _check_lora_init(cfg: TrainConfig, lora: dict, init: str):
    """An --init LoRA run's adapters keep training as they are: a different shape is refused
    (rather than recorded but not used)."""
    q = lora.get("quantization") or {}
    used = {"lora_rank": lora["rank"], "lora_scale": lora["scale"], "lora_layers": lora.get("layers", 0),
            "lora_dropout": lora.get("dropout", 0.0)}
    if q:
        used.update(q_bits=q["bits"], q_group_size=q["group_size"])
    for name, value in used.items():
        if getattr(cfg, name) != value:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: --init {init} is a LoRA run "
                            f"whose adapters keep training with {name.replace('_', '-')} {value}; drop "
                            f"the flag (or start LoRA from a full-weight run / model)")


def validate(cfg: TrainConfig):
    if cfg.mode not in MODES:
        raise UserError(f"--mode {cfg.mode}: choose from {', '.join(MODES)}")
    if cfg.mode in ("cot", "no-cot") and cfg.stage != 0:
        raise UserError(f"--mode {cfg.mode} has no stages (use --stage 0 or --mode coconut)")
    if cfg.mode in ("coconut", "pause") and cfg.stage > 0 and cfg.c_thought < 1:
        raise UserError(f"--stage {cfg.stage} with --c-thought {cfg.c_thought}: a COCONUT stage needs "
                        f"at least one thought per step (use --mode no-thought to drop steps without thoughts)")
    for name in ("stage", "c_thought", "max_latent_stage"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("epochs", "batch_size", "grad_accumulation_steps", "max_seq_length", "bucket"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= cfg.uniform_prob <= 1:
        raise UserError("--uniform-prob must be in [0, 1]")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype {cfg.dtype}: choose from {', '.join(DTYPES)}")
    if cfg.q_bits is not None and not cfg.lora:
        raise UserError("-q/--q-bits quantizes the frozen base for QLoRA: add --lora")
    if cfg.q_bits is not None and cfg.q_bits not in (2, 3, 4, 5, 6, 8):
        raise UserError(f"--q-bits {cfg.q_bits}: choose from 2, 3, 4, 5, 6, 8")
    if cfg.reset_optimizer not in RESET_CHOICES:
        raise UserError(f"--reset-optimizer {cfg.reset_optimizer}: choose from {', '.join(RESET_CHOICES)}")
    if not (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise UserError(f"--learning-rate must be a finite number > 0 (got {cfg.learning_rate})")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UserError(f"--weight-decay must be a finite number >= 0 (got {cfg.weight_decay})")
    for name in ("samples", "eval_samples", "synth_samples", "save_every", "max_new_tokens",
                 "lora_rank", "lora_layers", "q_group_size"):
        value, least = getattr(cfg, name), 0 if name in ("eval_samples", "save_every", "lora_layers") else 1
        if value is not None and value < least:
            raise UserError(f"--{name.replace('_', '-')} must be >= {least} (got {value})")
    if cfg.c_thought > MAX_C_THOUGHT:
        raise UserError(f"--c-thought {cfg.c_thought}: at most {MAX_C_THOUGHT} thoughts per step")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1) (got {cfg.lora_dropout})")
    if not (math.isfinite(cfg.lora_scale) and cfg.lora_scale > 0):
        raise UserError(f"--lora-scale must be a finite number > 0 (got {cfg.lora_scale})")
    if cfg.q_bits is not None and cfg.q_group_size not in (32, 64, 128):
        raise UserError(f"--q-group-size {cfg.q_group_size}: choose from 32, 64, 128")


def check_writable(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: not writable ({e.strerror or e})") from None


# ---------------------------------------------------------------- memory estimate


def count_params(config: dict) -> int:
    """Parameter count of a Llama from its config.json (no weights needed)."""
    D, L, I, V = (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                  config["vocab_size"])
    H = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or D // H
    per_layer = 2 * D * H * hd + 2 * D * KV * hd + 3 * D * I + 2 * D
    return L * per_layer + V * D * (1 if config.get("tie_word_embeddings") else 2) + D


def available_memory() -> Optional[int]:
    try:
        if mx.metal.is_available():
            return int(mx.device_info()["max_recommended_working_set_size"])
    except Exception:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def lora_params(config: dict, cfg: TrainConfig) -> int:
    """Trainable parameters of a LoRA run: rank-r A and B on the 7 projections of each LoRA block,
    and the three new-token rows of the embedding (and untied head)."""
    D, I, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or D // H
    per_rank = 2 * (D + H * hd) + 2 * (D + KV * hd) + 3 * (D + I)  # q, o; k, v; gate, up, down
    blocks = min(_given(cfg, "lora_layers") or L, L)
    rows = 3 * D * (1 if config.get("tie_word_embeddings") else 2)
    return _given(cfg, "lora_rank") * per_rank * blocks + rows


def _given(cfg: TrainConfig, name: str):
    value = getattr(cfg, name)
    return DEFAULTS[name] if value is None else value


def memory_estimate(config: dict, cfg: TrainConfig) -> tuple:
    """(params, bytes before activations) of what training holds. Full: weights and gradients in
    --dtype (summed over accumulated micro-batches in fp32), two fp32 AdamW moments, and fp32 masters
    when --dtype is not fp32. LoRA: the frozen base (quantized: the bits plus a scale and a bias per
    group) and the fp32 adapters and new-token rows with their gradients and moments."""
    p = count_params(config)
    w = DTYPES[cfg.dtype].size
    if not cfg.lora:
        grads = 4 if _given(cfg, "grad_accumulation_steps") > 1 else w
        return p, p * (w + grads + 8 + (4 if w < 4 else 0))
    quant = config.get("quantization") or {}
    bits = cfg.q_bits or quant.get("bits")
    group = (_given(cfg, "q_group_size") if cfg.q_bits else quant.get("group_size")) or 64
    base = p * (bits / 8 + 2 * w / group) if bits else p * w
    return p, int(base + lora_params(config, cfg) * (4 + 4 + 8))


def warn_memory(model_dir: Path, cfg: TrainConfig, log):
    cfg_file = model_dir / "config.json"
    if not cfg_file.exists():
        return
    try:
        config = json.loads(cfg_file.read_text())
        params, need = memory_estimate(config, cfg)
    except (KeyError, ValueError, TypeError):
        return
    avail = available_memory()
    if avail is not None and need > avail:
        what = "LoRA on the frozen base" if cfg.lora else \
            "full fine-tuning (weights + grads + 2 fp32 Adam moments + fp32 masters below fp32)"
        log(f"warning: {what} of this {params / 1e9:.2f}B-parameter model needs ~{need / 1e9:.1f} GB "
            f"before activations, but only {avail / 1e9:.1f} GB is available; "
            + ("use --lora (LoRA) or --lora -q 4 (QLoRA)" if not cfg.lora else "use -q 4 (QLoRA)"))


# ---------------------------------------------------------------- data


def load_data(cfg: TrainConfig, log) -> tuple:
    from .data import synth_records
    if cfg.train:
        records = load_records(cfg.train)
    else:
        records = synth_records(cfg.synth_samples, seed=cfg.seed)
    random.Random(cfg.seed).shuffle(records)  # seeded shuffle, then the first N
    if cfg.samples:
        records = records[: cfg.samples]
    if cfg.valid:
        valid = load_records(cfg.valid)
    elif not cfg.train:
        valid = synth_records(max(cfg.eval_samples, 1), seed=cfg.seed + 10_000)
    else:
        valid = records[: max(cfg.eval_samples, 1)]
        log(f"note: no --valid file; validating on {len(valid)} training records")
    return records, valid[: cfg.eval_samples] if cfg.eval_samples else []


def epoch_batches(records, tokenizer, fcfg: FormatConfig, ids: SpecialIds, cfg: TrainConfig,
                  epoch: int) -> list:
    """The epoch's batches of Examples: a deterministic function of (seed, epoch) so a resumed run
    sees exactly the same order (and the same uniform-stage draws)."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(records))
    rng = random.Random(cfg.seed * 1_000_003 + epoch)
    examples = [format_record(records[i], tokenizer, fcfg, ids, rng) for i in order]
    examples = [e for e in examples if len(e.input_ids) <= cfg.max_seq_length]
    bs = cfg.batch_size
    if bs > 1:
        # A batch is as wide as its longest row (at latent stages: its longest question + its longest
        # remainder, as the collator left-pads every row so the first latents share a column). Group
        # similar rows: sort each pool of POOL_BATCHES shuffled batches by latent start, then length,
        # cut it into optimizer steps and shuffle their order (seeded by (seed, epoch): --resume sees
        # the same batches). Cutting whole steps (batch x accumulation) keeps accumulated
        # micro-batches the same examples as one big batch; a short last step stays last.
        step = bs * cfg.grad_accumulation_steps
        pool = step * POOL_BATCHES
        order_rng = np.random.default_rng([cfg.seed, epoch, 1])
        steps, short = [], []
        for p in range(0, len(examples), pool):
            chunk = sorted(examples[p:p + pool], key=lambda e: (e.latent_start, len(e.input_ids)))
            cut = [chunk[i:i + step] for i in range(0, len(chunk), step)]
            if len(cut[-1]) < step:
                short = [cut.pop()]
            steps += [cut[i] for i in order_rng.permutation(len(cut))]
        return [s[i:i + bs] for s in steps + short for i in range(0, len(s), bs)]
    return [[e] for e in examples]


# ---------------------------------------------------------------- model set-up


def setup_model(cfg: TrainConfig, init_run: Optional[dict], log):
    """Load weights (model dir or run dir), add the latent tokens, apply LoRA/QLoRA.
    → (model, tokenizer, ids, run-record fields)."""
    from .tokens import INIT_TOKEN, LatentTokens, add_latent_tokens, reset_latent_rows

    dtype = DTYPES[cfg.dtype]
    ref = cfg.init or cfg.model
    source = ckpt.split_ref(ref)[0]
    if init_run and init_run.get("weights") == "lora" and not cfg.lora:
        raise UserError(f"--init {source} is a LoRA run: continue it with --lora")
    if init_run and init_run.get("weights") == "lora":
        base_dir = Path(init_run["base_model"])
    elif ckpt.is_run_dir(source):  # LoRA on top of a full-weight run: its checkpoint is the base
        base_dir = ckpt.checkpoint_dir(ref)
    else:
        base_dir = source
    warn_memory(base_dir, cfg, log)
    loaded = ckpt.load(ref, dtype=dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    lora_cfg = None
    if cfg.lora:
        lora_cfg = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout,
                    "layers": cfg.lora_layers, "quantization": None}
        if init_run and init_run.get("weights") == "lora":
            lora_cfg = init_run["lora"]  # same adapters keep training
            ids = ckpt.latent_token_ids(tokenizer)
            ids = (ids["start"], ids["latent"], ids["end"])
        else:
            ids = add_latent_tokens(model, tokenizer).ids
            if adapters.is_quantized(model):
                lora_cfg["quantization"] = None  # the base is stored quantized: used as-is
            elif cfg.q_bits:
                adapters.quantize_base(model, cfg.q_bits, cfg.q_group_size)
                lora_cfg["quantization"] = {"bits": cfg.q_bits, "group_size": cfg.q_group_size}
            adapters.apply_lora(model, lora_cfg, ids)
        weights = "lora"
    else:
        if adapters.is_quantized(model):
            raise UserError(f"{source}: the model is quantized; quantized weights cannot be fully "
                            f"fine-tuned: add --lora (QLoRA)")
        ids = add_latent_tokens(model, tokenizer).ids
        weights = "full"
    source_run = init_run or ckpt.read_run(source)
    source_mode = ((source_run or {}).get("settings") or {}).get("mode")
    if cfg.mode in ("coconut", "pause") and source_mode in ("cot", "no-cot"):
        reset_latent_rows(model, tokenizer, LatentTokens(*ids))
        log(f"latent tokens: rows re-initialised from '{INIT_TOKEN}' (first latent stage after a "
            f"{source_mode} run)")
    mx.eval(model.parameters())
    eos = int(tokenizer.eos_token_id)
    special = SpecialIds(ids[0], ids[1], ids[2], eos)
    record = {"weights": weights, "lora": lora_cfg,
              "base_model": str(base_dir.resolve()) if weights == "lora" else None,
              "source": str(source.resolve()), "init_checkpoint": loaded.checkpoint}
    return model, tokenizer, special, record


def enable_grad_checkpoint(model):
    """Recompute each whole transformer block (attention and MLP) in the backward pass instead of
    storing its activations. The latent loop writes the KV cache pass by pass, so the layer's key /
    value buffers go in and out of the checkpointed function explicitly: the recompute (which runs
    after later passes) writes at its own pass's offset into its own pass's buffers, and gradients
    still reach the keys/values of earlier passes."""
    block = type(model.layers[0])
    if getattr(block, "_coconut_ckpt", False):
        return
    fn = block.__call__

    def checkpointed(self, x, mask, positions, cache, layer):
        if cache is None:
            def inner(params, x):
                self.update(params)
                return fn(self, x, mask, positions, cache, layer)
            return mx.checkpoint(inner)(self.trainable_parameters(), x)
        off = cache.offset
        if cache.keys[layer] is None:  # allocate the buffers outside, so they can be inputs
            at = self.self_attn
            empty = mx.zeros((x.shape[0], at.n_kv_heads, 0, at.head_dim), x.dtype)
            cache._grow(layer, empty, empty, off + x.shape[1])

        def inner(params, x, k_buf, v_buf):
            self.update(params)
            cache.keys[layer], cache.values[layer] = k_buf, v_buf
            saved, cache.offset = cache.offset, off
            out = fn(self, x, mask, positions, cache, layer)
            cache.offset = saved
            return out, cache.keys[layer], cache.values[layer]

        out, cache.keys[layer], cache.values[layer] = mx.checkpoint(inner)(
            self.trainable_parameters(), x, cache.keys[layer], cache.values[layer])
        return out

    block._coconut_call = fn
    block.__call__ = checkpointed
    block._coconut_ckpt = True


def disable_grad_checkpoint(model):
    block = type(model.layers[0])
    if getattr(block, "_coconut_ckpt", False):
        block.__call__ = block._coconut_call
        block._coconut_ckpt = False


# ---------------------------------------------------------------- the step


def trace_key(batch: dict, feedback: bool = True, rows=None) -> tuple:
    """What a compiled step depends on besides the weights: the batch shape, the number of labelled
    positions the head runs on (`rows` from `supervised_rows`) and the latent layout (latent columns,
    and which rows hold a thought there)."""
    latent = batch["latent_mask"] if feedback else np.zeros_like(batch["latent_mask"])
    cols = np.flatnonzero(latent.any(axis=0))
    rows = supervised_rows(batch["labels"]) if rows is None else rows
    return batch["input_ids"].shape, rows.shape, tuple(cols.tolist()), latent[:, cols].tobytes()


class Stepper:
    """Loss + gradients for one micro-batch, mx.compile'd per key.

    The latent loop reads the latent columns on the host and bakes them into the graph as Python
    slices (and which rows hold a thought as constants), so a compiled trace is only valid for one
    latent layout: the cache key is (shape, number of labelled positions, latent columns, rows with
    thoughts). `make_batch` buckets T and the first latent column, `supervised_rows` the labelled
    positions, so the keys repeat; past `max_traces` keys batches run eagerly
    (mx.compile keeps every trace)."""

    MAX_TRACES = 256  # a GSM8k epoch at a latent stage uses ~150 keys; each trace compiles in ~1 s

    def __init__(self, model, feedback: bool, use_compile: bool, max_traces: int = MAX_TRACES):
        self.model, self.feedback, self.use_compile = model, feedback, use_compile
        self.value_and_grad = nn.value_and_grad(model, loss_fn)
        self.traces, self.max_traces = {}, max_traces
        self.layouts = set()  # keys seen since the caller last cleared it (traces used per epoch)
        self.state = [model.state, mx.random.state]

    def _compile(self, latent):
        model, vg, fb = self.model, self.value_and_grad, self.feedback

        @partial(mx.compile, inputs=self.state, outputs=self.state)  # value_and_grad re-binds params
        def step(x, y, left_pad, rows):
            (loss, ntoks), grads = vg(model, x, y, latent, left_pad, fb, rows=rows)
            return loss, ntoks, grads

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def plain(x, y, rows):  # no left padding: the fused causal mask
            (loss, ntoks), grads = vg(model, x, y, latent, None, fb, rows=rows)
            return loss, ntoks, grads

        return step, plain

    def __call__(self, batch):
        x, y = mx.array(batch["input_ids"]), mx.array(batch["labels"])
        latent, lp = batch["latent_mask"], batch["left_pad"]
        if not self.feedback:
            latent = np.zeros_like(latent)
        left_pad = mx.array(lp) if lp.any() else None
        rows = supervised_rows(batch["labels"])
        key = trace_key(batch, self.feedback, rows)
        self.layouts.add(key)
        if self.use_compile:
            fns = self.traces.get(key)
            if fns is None and len(self.traces) < self.max_traces:
                fns = self.traces[key] = self._compile(latent.copy())
            if fns is not None:
                return fns[0](x, y, left_pad, rows) if left_pad is not None else fns[1](x, y, rows)
        (loss, ntoks), grads = self.value_and_grad(self.model, x, y, latent, left_pad, self.feedback,
                                                   rows=rows)
        return loss, ntoks, grads


def validation_loss(model, batches, special, cfg, dist=None) -> float:
    total, n = 0.0, 0
    for ex in batches:
        if dist is not None and dist.enabled:
            ex = dist.shard(ex)  # this rank's share of the batch; the sums are reduced below
            if not ex:
                continue
        b = make_batch(ex, special.eos, special.latent, cfg.bucket)
        loss, ntoks = collated_loss(model, b, cfg.mode != "pause")
        mx.eval(loss, ntoks)
        total += loss.item() * ntoks.item()
        n += ntoks.item()
    if dist is not None and dist.enabled:
        parts = dist.gather_json([total, n], "the validation loss")
        total, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return total / max(n, 1)


# ---------------------------------------------------------------- progress


class Progress:
    def __init__(self, total: int, desc: str, done: int = 0, stream=sys.stderr):
        self.total, self.desc, self.stream, self.first = total, desc, stream, done
        self.start, self.tty = time.perf_counter(), stream.isatty()
        self.last, self.printed = 0.0, None

    def update(self, done: int, loss: float, tps: float, peak_gb: float, force=False):
        now = time.perf_counter()
        if not self.tty and (done == self.printed or (not force and now - self.last < 10)):
            return
        self.last, self.printed = now, done
        elapsed = now - self.start
        eta = elapsed / max(done - self.first, 1) * (self.total - done)  # this session's pace
        width = 24
        fill = int(width * done / max(self.total, 1))
        line = (f"{self.desc} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                f"loss {loss:.4f} | {tps:,.0f} tok/s | ETA {_hms(eta)} | peak {peak_gb:.2f} GB")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")


def _hms(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StartClock:
    """Where the time to the first optimizer step goes, for the "first step done" line: phases
    timed between laps from `started` (the process start, given by the CLI: the imports count) or
    from the stage's start."""

    NAMES = {"imports": "imports", "load": "load", "data": "data", "other": "other",
             "step": "trace+compile+step"}

    def __init__(self, started: Optional[float] = None):
        now = time.perf_counter()
        self.start = started if started is not None else now
        self.phases = {"imports": now - started} if started is not None else {}
        self.last = now

    def lap(self, phase: str):
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.start

    def rounded(self) -> dict:
        return {"total": round(self.total(), 3), **{k: round(v, 3) for k, v in self.phases.items()}}

    def line(self) -> str:
        parts = ", ".join(f"{self.NAMES[k]} {self.phases[k]:.1f} s" for k in self.NAMES if k in self.phases)
        start = "start" if "imports" in self.phases else "the stage started"
        return f"first step done {self.total():.1f} s after {start} ({parts})"


# ---------------------------------------------------------------- one stage


class _Interrupt:
    """Ctrl-C (or SIGTERM) sets a flag checked between optimizer steps: the run saves and stops. A
    second one aborts immediately. Under `mlx.launch` SIGTERM keeps the launcher's handler."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.prev = signal.getsignal(signal.SIGINT)
        self.prev_term = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGINT, self._handle)
            if not distributed.setup().enabled:
                signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self.prev = None
        return self

    def _handle(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)
            signal.signal(signal.SIGTERM, self.prev_term)


# may change on --resume (the number of epochs; speed only: recompute, compile); the rest is the
# run's recorded config (data order, optimisation, LoRA)
RESUME_FLAGS = ("out", "resume", "epochs", "stop_after_steps", "stage", "grad_checkpoint", "compile")
# what the data order of a checkpoint depends on (state.json records it; an edited coconut.json
# cannot silently resume on different batches)
ORDER_KEYS = ("train", "samples", "synth_samples", "seed", "stage", "mode", "c_thought",
              "max_latent_stage", "pad_latent_to_max", "uniform_prob", "batch_size",
              "grad_accumulation_steps", "max_seq_length")


def _check_resume_flags(config: TrainConfig, saved: dict, out: Path):
    """--resume continues the recorded run; a flag that would silently not apply is refused."""
    if config.stage not in (0, saved.get("stage")):  # 0 is also the CLI's default
        raise UserError(f"--resume: --stage {config.stage} differs from the run's stage "
                        f"{saved.get('stage')} in {out}; drop --stage")
    for name, value in asdict(config).items():
        if name in RESUME_FLAGS or value is None:
            continue
        recorded = saved.get(name)
        if name in ("model", "init", "train", "valid") and recorded is not None:
            same = Path(value).resolve() == Path(recorded).resolve()
        else:
            same = value == recorded
        if not same:
            raise UserError(f"--resume: --{name.replace('_', '-')} {value} differs from the run's "
                            f"recorded {recorded!r} ({out}/{ckpt.RUN_FILE}); a resumed run keeps its "
                            f"settings (only --epochs may change): drop the flag, or start a new --out")


def _check_order(state: dict, cfg: TrainConfig, out: Path):
    recorded = state.get("data_order")
    if not recorded:
        return
    now = {k: getattr(cfg, k) for k in ORDER_KEYS}
    diff = [f"{k} {recorded.get(k)!r} -> {now[k]!r}" for k in ORDER_KEYS if recorded.get(k) != now[k]]
    if diff:
        raise UserError(f"--resume: {out}/{ckpt.RUN_FILE} was edited since its checkpoint "
                        f"({', '.join(diff)}); the checkpoint's position in the data would be wrong: "
                        f"restore it or start a new --out")


def loss_warnings(losses: list, vocab: int) -> list:
    """Training that 'completes' but learned nothing useful: the loss sits at ln V (the uniform
    distribution: a collapsed model) or far above where it started (diverging without NaN)."""
    if len(losses) < 10:
        return []
    n = max(3, len(losses) // 10)
    start, recent, uniform = sum(losses[:n]) / n, sum(losses[-n:]) / n, math.log(vocab)
    if abs(recent - uniform) < 0.02 * uniform:
        return [f"the loss has stayed at ≈ ln V = {uniform:.2f} (the uniform distribution over the "
                f"{vocab} tokens) over the last {n} steps: the model has collapsed or learns nothing; "
                f"try a lower --learning-rate"]
    if recent > start + max(1.0, 0.5 * start):
        return [f"the loss rose from {start:.3f} to {recent:.3f} (mean of the first / last {n} steps): "
                f"training is diverging; try a lower --learning-rate"]
    return []


def _vocab(model) -> int:
    embed = model.model.embed_tokens
    return getattr(embed, "base", embed).weight.shape[0]  # LoRA: ExtraRows around the embedding


def train_stage(config: TrainConfig, log=print, started: Optional[float] = None) -> dict:
    # the run-directory lock (taken inside, once --out is validated) is released however we leave
    with contextlib.ExitStack() as held:
        return _train_stage(config, log, held, StartClock(started))


def _train_stage(config: TrainConfig, log, held: contextlib.ExitStack, clock) -> dict:
    dist = distributed.setup()  # size 1 unless started by `mlx.launch`
    if not dist.main:
        log = _quiet  # rank 0 prints; errors still reach every rank as UserError
    cfg, init_run, opt_state, resume_state = _start(config)
    out = Path(cfg.out)
    if resume_state and resume_state.get("complete") and resume_state["epoch"] >= cfg.epochs:
        log(f"{out}: already complete ({resume_state['step']} steps)")
        return {"out": str(out), "steps": resume_state["step"], "complete": True}
    run = RunDir(out, dist)
    run.open(held, resume_state["step"] if resume_state else None)
    mx.random.seed(cfg.seed)
    clock.lap("other")
    records, valid = load_data(cfg, log)
    clock.lap("data")
    model, tokenizer, special, record = _model_for(cfg, init_run, resume_state, out, log)
    clock.lap("load")
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model)
    model.train()
    settings = ckpt.Settings(mode=cfg.mode, stage=cfg.stage, c_thought=cfg.c_thought,
                             max_latent_stage=cfg.max_latent_stage,
                             pad_latent_to_max=cfg.pad_latent_to_max,
                             latent_ids={"start": special.start_latent, "latent": special.latent,
                                         "end": special.end_latent})
    run.record = _run_record(cfg, record, settings, special, new=resume_state is None)

    optimizer = _optimizer_for(model, cfg, init_run, opt_state, resume_state)
    step, start_epoch, start_batch = 0, 0, 0
    if resume_state:
        step, start_epoch, start_batch = (resume_state["step"], resume_state["epoch"],
                                          resume_state["batch"])
        log(f"resuming {out} at step {step} (epoch {start_epoch + 1}, batch {start_batch})")
        run.last_saved = ckpt.checkpoint_dir(out)
    if dist.enabled:
        _check_ranks(dist, model, records, valid, step, cfg, log)
    _log_start(cfg, record, model, out, len(records), log)

    clock.lap("other")
    epochs = _stage_epochs(records, tokenizer, special, cfg, start_epoch, start_batch)
    steps_per_epoch = math.ceil(math.ceil(len(records) / cfg.batch_size) / cfg.grad_accumulation_steps)
    step_fn = make_step_fn(model, special, cfg, dist)
    clock.lap("data")
    with _Interrupt() as interrupt:
        callbacks = StageCallbacks(run, model, tokenizer, settings, valid, special, cfg, log, interrupt,
                                   Progress(steps_per_epoch * cfg.epochs, "", done=step),
                                   clock=clock, stepper=step_fn.stepper)
        done = train_loop(model, optimizer, epochs, step_fn, callbacks,
                          cfg.grad_accumulation_steps, all_sum_reducer(dist) if dist.enabled else None,
                          start_step=step, compile_update=cfg.compile)
    result = {"out": str(out), "steps": done["step"], "losses": done["losses"],
              "interrupted": done["interrupted"]}
    if not done["interrupted"] and cfg.epochs > start_epoch:
        result["eval"] = callbacks.summary
    return result


def _optimizer_for(model, cfg: TrainConfig, init_run, opt_state, resume_state):
    """A fresh optimizer, with the saved moments of a resumed run (or of the --init run when the
    cadence is `never`)."""
    optimizer = make_optimizer(model, cfg)
    if resume_state:
        set_optimizer_state(optimizer, opt_state)
    elif reset_cadence(cfg) == "never" and init_run is not None:  # carry the --init run's moments
        # not its masters: they are its latest weights, and --init may have loaded RUN:best
        saved = dict(_flat(ckpt.load_optimizer_state(cfg.init)[0]))
        set_optimizer_state(optimizer, without_masters(saved))
    return optimizer


def _stage_epochs(records, tokenizer, special: SpecialIds, cfg: TrainConfig, start_epoch: int,
                  start_batch: int):
    """(epoch, batches, first batch) for the loop; the first epoch is formatted now, to refuse a run
    with nothing to train on before any step."""
    fcfg = FormatConfig.from_settings(cfg, uniform_prob=cfg.uniform_prob)
    first = epoch_batches(records, tokenizer, fcfg, special, cfg, start_epoch)
    if not first:
        raise UserError(f"nothing to train on: all {len(records)} records are longer than "
                        f"--max-seq-length {cfg.max_seq_length} tokens at stage {cfg.stage}"
                        if records else "nothing to train on: no training records")
    return ((e, first if e == start_epoch else epoch_batches(records, tokenizer, fcfg, special, cfg, e),
             start_batch if e == start_epoch else 0) for e in range(start_epoch, cfg.epochs))


def _start(config: TrainConfig) -> tuple:
    """(resolved config, --init run, optimizer state, state.json) of a new or a resumed run; the
    last two are None for a new run."""
    if not config.resume:
        cfg, init_run = resolve(config)
        if ckpt.is_run_dir(Path(cfg.out)):
            raise UserError(f"--out {Path(cfg.out)} already holds a run: pass --resume to continue it, "
                            f"or choose another --out")
        return cfg, init_run, None, None
    out = Path(config.out) if config.out else None
    if out is None or not ckpt.is_run_dir(out):
        raise UserError(f"--resume: {out} is not a run directory with a checkpoint")
    saved = ckpt.read_run(out)
    _check_resume_flags(config, saved["config"], out)
    cfg = config_from_dict(saved["config"], f"{out}/{ckpt.RUN_FILE}")
    for name in ("epochs", "grad_checkpoint", "compile"):  # what may change on resume
        if getattr(config, name) is not None:
            setattr(cfg, name, getattr(config, name))
    cfg.stop_after_steps, cfg.resume = config.stop_after_steps, True
    init_run = ckpt.read_run(cfg.init) if cfg.init else None
    opt_state, resume_state = ckpt.load_optimizer_state(out)
    _check_order(resume_state, cfg, out)
    return cfg, init_run, opt_state, resume_state


def _model_for(cfg: TrainConfig, init_run, resume_state, out: Path, log) -> tuple:
    """(model, tokenizer, special ids, run record): the run's latest checkpoint when resuming, else
    set up from --model / --init."""
    if not resume_state:
        return setup_model(cfg, init_run, log)
    loaded = ckpt.load(f"{out}:latest", dtype=DTYPES[cfg.dtype])
    lid = loaded.settings.latent_ids
    special = SpecialIds(lid["start"], lid["latent"], lid["end"], int(loaded.tokenizer.eos_token_id))
    record = {k: loaded.run.get(k) for k in ("weights", "lora", "base_model", "source", "init_checkpoint")}
    return loaded.model, loaded.tokenizer, special, record


def _run_record(cfg: TrainConfig, record: dict, settings, special: SpecialIds, new: bool) -> dict:
    """coconut.json minus "checkpoint": how the run was trained and from what."""
    run_record = {**record, "settings": ckpt.settings_dict(settings), "config": asdict(cfg),
                  "dtypes": run_dtypes(cfg.dtype, record["weights"] == "lora"), "eos_id": special.eos,
                  "init": str(ckpt.split_ref(cfg.init)[0].resolve()) if cfg.init else None}
    run_record["config"]["resume"] = False
    run_record["config"]["stop_after_steps"] = None
    if record.get("weights") == "lora" and new:
        run_record["base_fingerprint"] = ckpt.base_fingerprint(record["base_model"])
    return run_record


def _log_start(cfg: TrainConfig, record: dict, model, out: Path, n_records: int, log):
    n_params = sum(v.size for _, v in _flat(model.trainable_parameters()))
    qlora = " (QLoRA)" if record.get("lora") and record["lora"].get("quantization") else ""
    dtypes = run_dtypes(cfg.dtype, record["weights"] == "lora")
    masters = " (fp32 masters)" if dtypes["trainable"] != "float32" else ""
    log(f"training stage {cfg.stage} ({cfg.mode}, c={cfg.c_thought}) on {n_records} records, "
        f"{record['weights']}{qlora} fine-tune, {n_params / 1e6:.2f}M trainable parameters "
        f"({dtypes['trainable']}{masters}), {cfg.dtype} weights -> {out}")


# ---------------------------------------------------------------- step function


def make_step_fn(model, special: SpecialIds, cfg: TrainConfig, dist):
    """The loop's step function: loss and gradients of one micro-batch (this rank's share of it
    under data parallelism)."""
    stepper = Stepper(model, cfg.mode != "pause", cfg.compile)

    def step_fn(examples, epoch: int, bi: int) -> tuple:
        # RNG (LoRA dropout) keyed by position in the run, so a resumed run draws the same
        mx.random.seed(cfg.seed * 1_000_003 + epoch * 100_003 + bi)
        if dist.enabled:  # this rank's share, its gradient weighted by its share of tokens
            loss, grads, tokens = shard_step(stepper, model, examples, special, cfg, dist)
        else:
            batch = make_batch(examples, special.eos, special.latent, cfg.bucket)
            loss, _, grads = stepper(batch)
            tokens = batch["ntokens"]
        return loss, grads, supervised_tokens(examples), tokens
    step_fn.stepper = stepper  # its trace keys per epoch are reported
    return step_fn


def all_sum_reducer(dist):
    """One all_sum per optimizer step: gradients, loss and the stop flag (every rank stops at the
    same step)."""
    def reduce(grads, loss, stop: bool, step: int) -> tuple:
        grads, loss, hit = dist.all_sum((grads, loss, mx.array(float(stop))), f"step {step}")
        return grads, loss, hit.item() > 0
    return reduce


# ---------------------------------------------------------------- run directory + callbacks


class RunDir:
    """The run directory one training process owns: its lock, metrics.jsonl, the checkpoints and
    the best one. Rank 0 writes; every rank waits until each checkpoint is committed."""

    def __init__(self, path: Path, dist):
        self.path, self.dist = Path(path), dist
        self.record = None      # coconut.json minus "checkpoint" (set once the model is set up)
        self.last_saved = None  # the latest committed checkpoint directory

    def open(self, held: contextlib.ExitStack, resume_step: Optional[int]):
        """Take the lock and clean up after a killed process (rank 0 only)."""
        if not self.dist.main:
            return
        check_writable(self.path)
        held.enter_context(ckpt.RunLock(self.path))
        ckpt.remove_stale_temps(self.path)  # of a process killed mid-write (we hold the lock)
        # a resumed run trains the steps after its checkpoint again; a new run drops the lines of
        # one that failed before its first checkpoint
        ckpt.truncate_jsonl(self.path / "metrics.jsonl", -1 if resume_step is None else resume_step)

    def log_metrics(self, record: dict):
        if self.dist.main:
            ckpt.append_jsonl(self.path / "metrics.jsonl", record)

    def save(self, model, tokenizer, optimizer, state: dict) -> Path:
        """Checkpoint `state` (refusing non-finite weights, naming the last good checkpoint)."""
        if not ckpt.all_finite(model.trainable_parameters()):  # never write or point at bad weights
            raise UserError(f"the weights are not finite (NaN/inf) at step {state['step']} (stage "
                            f"{state['stage']}, epoch {state['epoch'] + 1}): training diverged, "
                            f"stopped; {self.last_good()}; try a lower --learning-rate")
        if self.dist.main:  # the other ranks hold the same weights
            self.last_saved = self.dist.checkpoint = ckpt.save_checkpoint(
                self.path, self.record, model, tokenizer, optimizer, state)
        # no rank leaves before the checkpoint is committed (`mlx.launch` kills the other ranks as
        # soon as one exits with an error code, e.g. 130 after Ctrl-C)
        self.dist.barrier(f"the checkpoint at step {state['step']}")
        return self.last_saved

    def last_good(self) -> str:
        return f"the last good checkpoint is {self.last_saved}" if self.last_saved else \
            "no checkpoint was saved"

    def mark_best(self, accuracy: float, epoch: int, step: int) -> bool:
        return self.dist.main and ckpt.mark_best(self.path, accuracy, epoch, step)


class StageCallbacks(Callbacks):
    """One stage's reporting: metrics.jsonl, the progress bar, checkpoints (--save-every, Ctrl-C /
    --stop-after-steps, every epoch end), the optimizer reset cadence, epoch evaluation and the
    best checkpoint."""

    def __init__(self, run: RunDir, model, tokenizer, settings, valid, special, cfg, log, interrupt, bar,
                 clock=None, stepper=None):
        self.run, self.model, self.tokenizer, self.settings = run, model, tokenizer, settings
        self.valid, self.special, self.cfg, self.log = valid, special, cfg, log
        self.interrupt, self.bar = interrupt, bar
        self.reset, self.losses, self.tps, self.summary = reset_cadence(cfg), [], 0.0, None
        self.clock = clock      # until the first step is reported
        self.stepper = stepper  # its `layouts` (trace keys seen) are cleared at each epoch start

    def _state(self, step, epoch, batch, complete=False) -> dict:
        cfg = self.cfg
        return {"step": step, "epoch": epoch, "batch": batch, "stage": cfg.stage, "seed": cfg.seed,
                "complete": complete, "data_order": {k: getattr(cfg, k) for k in ORDER_KEYS}}

    def _traces(self) -> str:
        """The epoch's shape buckets: one compiled trace each (the Stepper compiles a bounded number;
        later new keys run eagerly)."""
        used = self.stepper.layouts
        what = "distinct batch shapes and latent layouts"
        if not self.cfg.compile:
            return f"{len(used)} shape buckets ({what}; compile off)"
        eager = len(used - self.stepper.traces.keys())
        return (f"{len(used)} compiled traces ({what})" if not eager else
                f"{len(used)} shape buckets ({what}): {len(used) - eager} compiled traces, {eager} ran eagerly")

    def _save(self, optimizer, step, epoch, batch, complete=False) -> Path:
        return self.run.save(self.model, self.tokenizer, optimizer, self._state(step, epoch, batch, complete))

    def begin_epoch(self, epoch, first, optimizer):
        if self.reset == "epoch" and epoch > 0 and first == 0:  # official reset_optimizer: every epoch
            optimizer = make_optimizer(self.model, self.cfg, previous=optimizer)  # keeps the masters
        self.bar.desc = f"stage {self.cfg.stage} epoch {epoch + 1}/{self.cfg.epochs}"
        mx.reset_peak_memory()
        if self.stepper is not None:
            self.stepper.layouts.clear()
        return optimizer

    def stop_requested(self) -> bool:
        return self.interrupt.hit

    def diverged(self, r: StepReport):
        raise UserError(f"loss is {r.loss} at step {r.step} (stage {self.cfg.stage}, epoch {r.epoch + 1}): "
                        f"training diverged, stopped; {self.run.last_good()}; try a lower --learning-rate")

    def after_step(self, r: StepReport, stop: bool) -> bool:
        cfg, dist = self.cfg, self.run.dist
        self.losses.append(r.loss)
        self.tps, peak = r.tokens_per_sec, mx.get_peak_memory() / 1e9
        extra = {}
        if self.clock is not None:  # before the progress bar draws: a line of its own on a terminal
            self.clock.lap("step")
            self.log(self.clock.line())
            extra["first_step_s"], self.clock = self.clock.rounded(), None
        if self.stepper is not None and r.next_batch == r.n_batches:  # the epoch's last step
            extra["traces"] = len(self.stepper.layouts)
        self.run.log_metrics({
            "step": r.step, "stage": cfg.stage, "epoch": r.epoch + 1, "loss": round(r.loss, 6),
            "lr": float(r.optimizer.learning_rate.item()), "tokens": r.tokens,
            "tokens_per_sec": round(r.tokens_per_sec, 1), "peak_memory_gb": round(peak, 3),
            "time": round(time.time(), 3), **extra,
            **({"ranks": dist.size, "all_sum_s": round(dist.wait_s, 3)} if dist.enabled else {})})
        if dist.main:
            self.bar.update(r.step, r.loss, r.tokens_per_sec, peak)
        if stop or (cfg.stop_after_steps is not None and r.step >= cfg.stop_after_steps):
            if dist.main:
                self.bar.close()
            path = self._save(r.optimizer, r.step, r.epoch, r.next_batch)
            self.log(f"interrupted: saved {path} (step {r.step}); continue with "
                     f"`mlx-coconut train --resume --out {self.run.path}`")
            dist.barrier("stopping")  # rank 0 has said so before any rank exits
            return True
        if cfg.save_every and r.step % cfg.save_every == 0 and r.next_batch < r.n_batches:
            self._save(r.optimizer, r.step, r.epoch, r.next_batch)
        return False

    def end_epoch(self, epoch, step, optimizer):
        """Save, warn about a loss that learned nothing, evaluate, record the best checkpoint."""
        dist = self.run.dist
        if dist.main:
            self.bar.update(step, self.losses[-1] if self.losses else float("nan"),
                            self.tps if self.losses else 0.0, mx.get_peak_memory() / 1e9, force=True)
            self.bar.close()
        if self.stepper is not None:
            self.log(f"epoch {epoch + 1}: {self._traces()}")
        self._save(optimizer, step, epoch + 1, 0, complete=epoch + 1 >= self.cfg.epochs)
        warnings = loss_warnings(self.losses, _vocab(self.model))
        for w in warnings:
            self.log(f"warning: {w}")
        summary = end_of_epoch(self.model, self.tokenizer, self.settings, self.valid,
                               self.settings.format_config(), self.special, self.cfg, epoch, step,
                               self.run.path, self.log, dist, warnings)
        if "accuracy" in summary and self.run.mark_best(summary["accuracy"], epoch + 1, step):
            self.log(f"best validation accuracy so far: {self.run.last_saved.name} is {self.run.path}:best")
        self.model.train()
        self.summary = summary


def _quiet(*_, **__):
    pass


def supervised_tokens(examples) -> int:
    """Tokens the loss is averaged over (labels != -100; the first position never is one)."""
    return sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)


def shard_step(stepper, model, examples, special, cfg, dist) -> tuple:
    """This rank's contiguous share of a global batch → (loss, grads, real tokens of the whole batch),
    loss and grads scaled by n_rank / n_batch (supervised tokens) so that their all_sum over the ranks
    is the loss and gradient of one process on the whole batch. Every rank collates every share (cheap,
    host-side) to know all the n_r; a rank with no rows (batch smaller than the ranks) adds zeros."""
    shards = [make_batch(s, special.eos, special.latent, cfg.bucket) if s else None
              for s in dist.split(examples)]
    counts = [distributed.supervised_tokens(b) if b is not None else 0 for b in shards]
    ntokens = sum(int(b["ntokens"]) for b in shards if b is not None)
    mine, total = shards[dist.rank], max(sum(counts), 1)
    if mine is None or counts[dist.rank] == 0:
        zeros = tree_map(mx.zeros_like, model.trainable_parameters())
        return mx.array(0.0), zeros, ntokens
    loss, _, g = stepper(mine)
    w = counts[dist.rank] / total
    return loss * w, tree_map(lambda v: v * w, g), ntokens


def _check_ranks(dist, model, records, valid, step, cfg, log):
    """Same data, same start, same weights on every rank (else a clear error, not silent drift)."""
    total = sum(mx.abs(v.astype(mx.float32)).sum() for _, v in _flat(model.trainable_parameters()))
    dist.check_same({"records": len(records), "valid": len(valid), "step": step,
                     "batch_size": cfg.batch_size, "seed": cfg.seed, "stage": cfg.stage,
                     "weights_checksum": round(float(total.item()), 3)})
    log(f"data parallel: {dist.size} ranks, global batch {cfg.batch_size} "
        f"(≤ {math.ceil(cfg.batch_size / dist.size)} per rank), gradients all-summed each step")


def reset_cadence(cfg: TrainConfig) -> str:
    """When the optimizer is re-created: every `epoch` (official latent stages), once per `stage` (a
    fresh optimizer for each run), or `never` (a run started with --init continues its optimizer)."""
    if cfg.reset_optimizer is not None:
        return cfg.reset_optimizer
    return "stage" if cfg.mode in ("cot", "no-cot") else "epoch"


def _flat(tree):
    from mlx.utils import tree_flatten
    return tree_flatten(tree)


def end_of_epoch(model, tokenizer, settings, valid, vfcfg, special, cfg, epoch, step, out, log,
                 dist=None, warnings=None) -> dict:
    """Validation loss + greedy generation accuracy on the validation records, 5 sample predictions,
    appended to eval.json."""
    model.eval()
    entry = {"epoch": epoch + 1, "step": step, "stage": cfg.stage}
    if warnings:
        entry["warnings"] = list(warnings)
    if valid:
        vex = [format_record(r, tokenizer, vfcfg, special) for r in valid]
        vex = [e for e in vex if len(e.input_ids) <= cfg.max_seq_length]
        vb = [vex[i:i + cfg.batch_size] for i in range(0, len(vex), cfg.batch_size)]
        entry["valid_loss"] = validation_loss(model, vb, special, cfg, dist)
        batch = max(cfg.batch_size, EVAL_BATCH_SIZE)
        if dist is not None and dist.enabled:  # each rank generates for its share, results gathered
            res = evaluate_sharded(dist, model, tokenizer, settings, valid, batch_size=batch,
                                   max_tokens=cfg.max_new_tokens)
        else:
            res = evaluate(model, tokenizer, settings, valid, batch_size=batch, max_tokens=cfg.max_new_tokens)
        entry.update(res.summary())
        entry["samples"] = res.examples[:5]
        log(f"epoch {epoch + 1}: valid loss {entry['valid_loss']:.4f} | accuracy {res.accuracy:.3f} "
            f"({sum(e['correct'] for e in res.examples)}/{res.n}) | {res.mean_generated_tokens:.1f} "
            f"generated tokens/question | {res.seconds:.1f}s")
        for e in res.examples[:5]:
            mark = "ok " if e["correct"] else "bad"
            q = e["question"] if len(e["question"]) < 70 else e["question"][:67] + "..."
            pred = e["prediction"] if len(e["prediction"]) <= 20 else e["prediction"][:17] + "..."
            log(f"  [{mark}] {q} | answer {e['answer']} | predicted {pred!r} | "
                f"generated {e['generated'][:60]!r}")
    if dist is not None and not dist.main:
        return entry
    evals_file = out / "eval.json"
    evals = json.loads(evals_file.read_text()) if evals_file.exists() else []
    evals = [e for e in evals if e.get("epoch") != epoch + 1] + [entry]
    ckpt.write_json_atomic(evals_file, evals)
    return entry
