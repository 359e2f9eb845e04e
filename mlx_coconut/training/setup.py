"""Setting a stage up: its records (read or synthesised, seeded shuffle), its epochs' batches (a
deterministic function of seed and epoch, grouped by length and latent start), and its model (from
--model, an --init run or the run being resumed: latent tokens, LoRA / QLoRA, the run record)."""

import random
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .. import adapters, checkpoint as ckpt
from ..data import FormatConfig, SpecialIds, format_record, load_records
from ..errors import UserError
from ..options import TrainConfig
from ..run import Run, Settings, settings_dict, split_ref
from .memory import warn_memory

POOL_BATCHES = 16  # latent stages: batches grouped by latent start within pools of this many
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def load_data(cfg: TrainConfig, log) -> tuple:
    from ..data import synth_records
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


def stage_model(cfg: TrainConfig, init_run: Optional[Run], resumed: Optional[Run], log) -> tuple:
    """The stage's model, in train mode, and what describes it: → (model, tokenizer, special ids,
    settings, run record)."""
    if resumed is not None:
        model, tokenizer, special, source = resumed_model(cfg, resumed)
    else:
        model, tokenizer, special, source = setup_model(cfg, init_run, log)
    model.train()
    settings = stage_settings(cfg, special)
    return model, tokenizer, special, settings, run_record(cfg, source, settings, special)


def setup_model(cfg: TrainConfig, init_run: Optional[Run], log):
    """Load weights (model dir or run dir), add the latent tokens, apply LoRA/QLoRA.
    → (model, tokenizer, ids, run-record fields)."""
    from ..tokens import INIT_TOKEN, LatentTokens, add_latent_tokens, reset_latent_rows

    ref = cfg.init or cfg.model
    source = split_ref(ref)[0]
    source_run = init_run or Run.read(ref)  # --model may name a run too: read once
    if init_run and init_run.lora and not cfg.lora:
        raise UserError(f"--init {source} is a LoRA run: continue it with --lora")
    if init_run and init_run.lora:
        base_dir = Path(init_run.record["base_model"])
    elif source_run is not None:  # LoRA on top of a full-weight run: its checkpoint is the base
        base_dir = source_run.checkpoint()
    else:
        base_dir = source
    warn_memory(base_dir, cfg, log)
    loaded = ckpt.load(source_run or ref, dtype=DTYPES[cfg.dtype])
    model, tokenizer = loaded.model, loaded.tokenizer
    lora_cfg = None
    if cfg.lora:
        lora_cfg = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout,
                    "layers": cfg.lora_layers, "quantization": None}
        if init_run and init_run.lora:
            lora_cfg = init_run.record["lora"]  # same adapters keep training
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
    source_mode = (source_run.record.get("settings") or {}).get("mode") if source_run else None
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
    if weights == "lora":  # a new LoRA run records its base, so that its adapters are not put on another
        record["base_fingerprint"] = ckpt.base_fingerprint(record["base_model"])
    return model, tokenizer, special, record


def resumed_model(cfg: TrainConfig, resumed: Run) -> tuple:
    """(model, tokenizer, special ids, run-record fields) of the run being resumed, at its latest
    checkpoint."""
    loaded = ckpt.load(resumed, dtype=DTYPES[cfg.dtype])
    lid = loaded.settings.latent_ids
    special = SpecialIds(lid["start"], lid["latent"], lid["end"], int(loaded.tokenizer.eos_token_id))
    record = {k: resumed.record.get(k) for k in ("weights", "lora", "base_model", "source", "init_checkpoint")}
    return loaded.model, loaded.tokenizer, special, record


def stage_settings(cfg: TrainConfig, special: SpecialIds) -> Settings:
    """How the stage's model is to be prompted (coconut.json's "settings")."""
    return Settings(mode=cfg.mode, stage=cfg.stage, c_thought=cfg.c_thought,
                    max_latent_stage=cfg.max_latent_stage, pad_latent_to_max=cfg.pad_latent_to_max,
                    latent_ids={"start": special.start_latent, "latent": special.latent,
                                "end": special.end_latent})


def run_dtypes(dtype: str, lora: bool) -> dict:
    """What a run holds, as its coconut.json records it: the weights in --dtype; the trainable ones
    in --dtype too for a full fine-tune (with fp32 masters: optimizer.py), fp32 for LoRA (the
    adapters and new-token rows: adapters.py); updates in fp32 (optimizer.py)."""
    return {"weights": dtype, "trainable": "float32" if lora else dtype, "update": "float32"}


def run_record(cfg: TrainConfig, record: dict, settings: Settings, special: SpecialIds) -> dict:
    """coconut.json minus "checkpoint": how the run was trained and from what (`record`: what the
    weights came from, as `setup_model` / `resumed_model` found it)."""
    run_record = {**record, "settings": settings_dict(settings), "config": asdict(cfg),
                  "dtypes": run_dtypes(cfg.dtype, record["weights"] == "lora"), "eos_id": special.eos,
                  "init": str(split_ref(cfg.init)[0].resolve()) if cfg.init else None}
    run_record["config"]["resume"] = False
    run_record["config"]["stop_after_steps"] = None
    return run_record
