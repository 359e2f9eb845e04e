"""Validation at each epoch's end: the loss on the validation records, greedy-generation accuracy
with a few sample predictions, and warnings about a loss that learned nothing. The entry returned
goes into eval.json through the run directory (rundir.py)."""

import math

import mlx.core as mx

from ..coconut import collated_loss
from ..data import format_record, make_batch
from ..evaluate import BATCH_SIZE as EVAL_BATCH_SIZE, evaluate, evaluate_sharded


def epoch_entry(stage, epoch: int, step: int, warnings=None) -> dict:
    """Validation loss (on --val-batches of them) + greedy generation accuracy on the stage's
    validation records, 5 sample predictions (logged), as eval.json's entry for `epoch`."""
    model, tokenizer, cfg, dist, log = stage.model, stage.tokenizer, stage.cfg, stage.dist, stage.log
    model.eval()
    entry = {"epoch": epoch + 1, "step": step, "stage": cfg.stage}
    if warnings:
        entry["warnings"] = list(warnings)
    if not stage.valid:
        return entry
    vfcfg = stage.settings.format_config()
    vex = [format_record(r, tokenizer, vfcfg, stage.special) for r in stage.valid]
    vex = [e for e in vex if len(e.input_ids) <= cfg.max_seq_length]
    vb = [vex[i:i + cfg.batch_size] for i in range(0, len(vex), cfg.batch_size)]
    if cfg.val_batches >= 0:  # the loss on the first few batches only: a forward pass is dear
        vb = vb[:cfg.val_batches]
    if vb:
        entry["valid_loss"] = validation_loss(model, vb, stage.special, cfg, dist)
    batch = max(cfg.batch_size, EVAL_BATCH_SIZE)
    if dist is not None and dist.enabled:  # each rank generates for its share, results gathered
        res = evaluate_sharded(dist, model, tokenizer, stage.settings, stage.valid, batch_size=batch,
                               max_tokens=cfg.max_new_tokens)
    else:
        res = evaluate(model, tokenizer, stage.settings, stage.valid, batch_size=batch,
                       max_tokens=cfg.max_new_tokens)
    entry.update(res.summary())
    entry["samples"] = res.examples[:5]
    loss = f"valid loss {entry['valid_loss']:.4f} | " if "valid_loss" in entry else ""
    log(f"epoch {epoch + 1}: {loss}accuracy {res.accuracy:.3f} "
        f"({sum(e['correct'] for e in res.examples)}/{res.n}) | {res.mean_generated_tokens:.1f} "
        f"generated tokens/question | {res.seconds:.1f}s")
    for e in res.examples[:5]:
        mark = "ok " if e["correct"] else "bad"
        q = e["question"] if len(e["question"]) < 70 else e["question"][:67] + "..."
        pred = e["prediction"] if len(e["prediction"]) <= 20 else e["prediction"][:17] + "..."
        log(f"  [{mark}] {q} | answer {e['answer']} | predicted {pred!r} | "
            f"generated {e['generated'][:60]!r}")
    return entry


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


def vocab_size(model) -> int:
    embed = model.model.embed_tokens
    return getattr(embed, "base", embed).weight.shape[0]  # LoRA: ExtraRows around the embedding
