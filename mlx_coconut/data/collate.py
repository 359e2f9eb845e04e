"""Batching: pad formatted examples for training (`collate`, as the official `MyCollator`;
`make_batch` adds the latent-column alignment and length bucketing the compiled step wants) and
prompts for generation (`collate_prompts`)."""

import numpy as np

from .format import Example


def collate(examples, pad_id: int) -> dict:
    """Pad a training batch like the official `MyCollator`.

    Rows with latents are left-padded so that their FIRST latent sits in the same column (keeps the
    latent loop's per-step columns aligned across the batch); rows without latents are not
    left-padded. Then everything is right-padded to the longest row. Pads get label -100.
    Returns numpy int32 arrays: input_ids, labels (B, T); left_pad, lengths (B,). The model uses
    positions = column - left_pad and masks key columns < left_pad.
    """
    starts = [e.latent_start for e in examples if e.latent_start >= 0]
    target = max(starts) if starts else 0
    left = [target - e.latent_start if e.latent_start >= 0 else 0 for e in examples]
    width = max(l + len(e.input_ids) for l, e in zip(left, examples))
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int32)
    labels = np.full((len(examples), width), -100, dtype=np.int32)
    for i, (l, e) in enumerate(zip(left, examples)):
        input_ids[i, l : l + len(e.input_ids)] = e.input_ids
        labels[i, l : l + len(e.labels)] = e.labels
    return {
        "input_ids": input_ids,
        "labels": labels,
        "left_pad": np.array(left, dtype=np.int32),
        "lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int32),
    }


def collate_prompts(prompts, pad_id: int) -> dict:
    """Left-pad prompts (Examples or id lists) so they all END in the same column, for generation.

    Returns numpy int32 arrays: input_ids (B, T), left_pad (B,), lengths (B,).
    """
    rows = [p.prompt_ids if isinstance(p, Example) else list(p) for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = r
    return {
        "input_ids": input_ids,
        "left_pad": np.array([width - len(r) for r in rows], dtype=np.int32),
        "lengths": np.array([len(r) for r in rows], dtype=np.int32),
    }


def make_batch(examples, pad_id: int, latent_id: int, bucket: int, latent_align: int = 8) -> dict:
    """Collate (official left padding: every row's first latent in the same column), shift all rows
    right so that column is a multiple of `latent_align`, then right-pad T up to a multiple of
    `bucket`: compiled steps see few distinct (shape, latent columns) keys. Extra left padding is
    masked and positions are column - left_pad, so the loss is unchanged."""
    b = collate(examples, pad_id)
    ids = b["input_ids"]
    cols = np.flatnonzero((ids == latent_id).any(axis=0))
    shift = (-int(cols[0])) % latent_align if len(cols) else 0
    B, T = ids.shape
    Tb = ((T + shift + bucket - 1) // bucket) * bucket
    b["input_ids"] = np.pad(ids, ((0, 0), (shift, Tb - T - shift)), constant_values=pad_id)
    b["labels"] = np.pad(b["labels"], ((0, 0), (shift, Tb - T - shift)), constant_values=-100)
    b["left_pad"] = b["left_pad"] + shift
    b["latent_mask"] = b["input_ids"] == latent_id
    b["ntokens"] = int(b["lengths"].sum())
    return b
