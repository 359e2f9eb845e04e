"""The one formatter: a record -> token ids for training, evaluation and generation.

`format_record` follows the official `dataset.py` (`get_dataset`, `get_cot_latent_dataset`,
`get_question_latent_dataset`) token for token; `latent_counts` says how many steps a stage replaces
and how many latent tokens stand in for them.
"""

import random
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError
from ..options import FORMAT_DEFAULTS, MAX_C_THOUGHT, MODES, check_fields  # noqa: F401 (re-exported)
from ..tokens import add_tokens_to_tokenizer
from .records import Record


FORMAT_FIELDS = ("mode", "stage", "c_thought", "max_latent_stage", "uniform_prob")


@dataclass(frozen=True)
class FormatConfig:
    """How a record becomes model input.

    mode: `cot` (question, all steps, answer; no markers), `no-cot` (question, answer), `coconut`
    (question, <|start-latent|>, latents, <|end-latent|>, remaining steps, answer; hidden states are
    fed back), `pause` (same tokens as coconut, but the latents stay ordinary learned tokens: the
    paper's "pause as thought"), `no-thought` (curriculum removes steps but adds no latents and no
    markers: the paper's "w/o thought").
    """

    mode: str = "cot"
    stage: int = 0
    c_thought: int = FORMAT_DEFAULTS["c_thought"]
    max_latent_stage: int = FORMAT_DEFAULTS["max_latent_stage"]
    pad_latent_to_max: bool = FORMAT_DEFAULTS["pad_latent_to_max"]
    uniform_prob: float = FORMAT_DEFAULTS["uniform_prob"]

    def __post_init__(self):
        """The constraints options.py declares for these fields (those a `train` config is checked
        against), so a FormatConfig built by hand or from an edited coconut.json fails clearly."""
        check_fields(self, FORMAT_FIELDS, flag=str)

    @classmethod
    def from_settings(cls, s, stage: Optional[int] = None, uniform_prob: float = 0.0) -> "FormatConfig":
        """From anything holding mode, stage, c_thought, max_latent_stage and pad_latent_to_max (a
        TrainConfig, a run.Settings). `stage` overrides the settings' stage."""
        return cls(mode=s.mode, stage=s.stage if stage is None else stage, c_thought=s.c_thought,
                   max_latent_stage=s.max_latent_stage, pad_latent_to_max=s.pad_latent_to_max,
                   uniform_prob=uniform_prob)


@dataclass(frozen=True)
class SpecialIds:
    start_latent: int
    latent: int
    end_latent: int
    eos: int


@dataclass
class Example:
    input_ids: list
    labels: list          # -100 on question, markers and latents
    prompt_ids: list      # question + markers + latents: what generation/eval starts from
    n_latents: int
    stage: int            # the stage actually used (differs from config.stage under uniform_prob)
    latent_start: int = -1  # index of the first latent in input_ids (and prompt_ids), -1 if none


@dataclass
class TokenizedRecord:
    question: list  # question + "\n", with special tokens (BOS for Llama 3)
    steps: list     # [step + "\n"], no special tokens
    answer: list    # "### " + answer, no special tokens, then EOS


def add_latent_special_ids(tokenizer, eos_id: Optional[int] = None) -> SpecialIds:
    """Ids of the three latent tokens (added to the tokenizer if missing) plus EOS.

    Tokenizer only (`tokens.add_latent_tokens` also grows the model; both add tokens the same way).
    Works on transformers tokenizers and mlx-lm's TokenizerWrapper.
    """
    tokens, _ = add_tokens_to_tokenizer(tokenizer)
    start, latent, end = tokens.ids
    eos = eos_id if eos_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer defines no EOS token; pass eos_id explicitly")
    return SpecialIds(start, latent, end, int(eos))


def encode_text(tokenizer, text: str, add_special_tokens: bool = False) -> list:
    """Ids of text from a user or a data file. Special-token strings in it (`<|latent|>`, BOS, EOS,
    `<|im_start|>`...) are encoded as the characters they are, never as control tokens: the thoughts
    a prompt gets are the ones its stage prescribes (inserted by id in `format_tokenized`), and a
    typed EOS cannot end a question. Text without such strings gets the ids of a plain encode."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True))


@dataclass(frozen=True)
class Templated:
    """A question rendered by a chat template: `parts` are (text, is_template) pairs. Template text
    keeps its special tokens (`<|im_start|>`); message text is encoded as text."""
    parts: tuple


def question_ids(tokenizer, question) -> list:
    """The one place a question becomes token ids: `question + "\n"` with the tokenizer's special
    tokens (BOS for Llama 3), its text encoded by `encode_text`. A `Templated` question gets the
    same leading special tokens, then each part (the last one + "\n") in turn."""
    if isinstance(question, str):
        return encode_text(tokenizer, question + "\n", add_special_tokens=True)
    ids = list(tokenizer.encode("", add_special_tokens=True))
    last = len(question.parts) - 1
    for i, (text, template) in enumerate(question.parts):
        text += "\n" if i == last else ""
        ids += tokenizer.encode(text, add_special_tokens=False) if template else encode_text(tokenizer, text)
    return ids


def tokenize_record(record: Record, tokenizer, eos_id: int) -> TokenizedRecord:
    """Tokenize the parts separately, exactly like the official `get_dataset` (text as text)."""
    return TokenizedRecord(
        question=question_ids(tokenizer, record.question),
        steps=[encode_text(tokenizer, s + "\n") for s in record.steps],
        answer=encode_text(tokenizer, "### " + record.answer) + [eos_id],
    )


def latent_counts(n_steps: int, stage: int, config: FormatConfig) -> tuple:
    """(steps skipped, latents in training input, latents in eval prompt) for a latent-mode stage.

    Mirrors the official code, including its asymmetry: in training (`get_cot_latent_dataset`) a
    stage k <= max_latent_stage always gets k*c latents, even if the record has fewer than k steps;
    the eval prompt (`get_question_latent_dataset`) caps at the number of steps (unless
    pad_latent_to_max). Past max_latent_stage both remove every step and use
    max_latent_stage (pad) or min(n_steps, max_latent_stage) thoughts.
    """
    c, m = config.c_thought, config.max_latent_stage
    if stage > m:
        skip = n_steps
        train = m if config.pad_latent_to_max else min(n_steps, m)
    else:
        skip = min(stage, n_steps)
        train = stage
    cap = m if config.pad_latent_to_max else min(m, n_steps)
    prompt = min(cap, stage)
    return skip, train * c, prompt * c


def format_tokenized(tok: TokenizedRecord, config: FormatConfig, ids: SpecialIds,
                     rng: Optional[random.Random] = None) -> Example:
    """Assemble input_ids / labels / prompt_ids from pre-tokenized parts (see `format_record`)."""
    n_steps = len(tok.steps)
    markers = config.mode in ("coconut", "pause")
    if config.mode == "cot":
        stage, skip, n_lat, n_prompt_lat = 0, 0, 0, 0
    elif config.mode == "no-cot":
        stage, skip, n_lat, n_prompt_lat = 0, n_steps, 0, 0
    else:
        stage = config.stage
        if config.uniform_prob > 0:
            if rng is None:
                raise ValueError("uniform_prob > 0 needs a seeded random.Random as rng")
            if rng.random() < config.uniform_prob:  # official: uniform over 0..len(steps)
                stage = rng.randrange(n_steps + 1)
        skip, n_lat, n_prompt_lat = latent_counts(n_steps, stage, config)
        if config.mode == "no-thought":
            n_lat = n_prompt_lat = 0

    def head(n):
        if not markers:
            return list(tok.question)
        return list(tok.question) + [ids.start_latent] + [ids.latent] * n + [ids.end_latent]

    prefix = head(n_lat)
    rest = [t for s in tok.steps[skip:] for t in s] + list(tok.answer)
    input_ids = prefix + rest
    labels = [-100] * len(prefix) + rest
    latent_start = len(tok.question) + 1 if markers and n_lat > 0 else -1
    return Example(input_ids, labels, head(n_prompt_lat), n_lat, stage, latent_start)


def format_record(record: Record, tokenizer, config: FormatConfig, ids: SpecialIds,
                  rng: Optional[random.Random] = None) -> Example:
    """The one formatter: a record -> token ids for training, evaluation and generation.

    Tokens: `question + "\\n"` (with special tokens, i.e. BOS for Llama 3), then for latent modes
    `<|start-latent|>`, n x `<|latent|>`, `<|end-latent|>`, then each remaining `step + "\\n"`, then
    `"### " + answer`, then EOS. There is no newline after `<|end-latent|>` (as official). Labels are
    -100 on the question, the markers and the latents. `rng` (random.Random) is required when
    `config.uniform_prob > 0`; evaluation should use uniform_prob=0 (as official).
    """
    return format_tokenized(tokenize_record(record, tokenizer, ids.eos), config, ids, rng)


def decode(tokenizer, ids) -> str:
    """Render token ids as text, special tokens included (what `data stats` shows)."""
    return tokenizer.decode(list(ids))


def check_tokenization_invariant(record: Record, tokenizer) -> tuple:
    """Official sanity check: parts tokenized separately == the whole text tokenized at once.

    Returns (ok, detail); never raises on a mismatch (BPE merges across a part boundary would make
    the formatted input differ from what the model sees in plain text).
    """
    whole = record.question + "\n" + "".join(s + "\n" for s in record.steps) + "### " + record.answer
    whole_ids = encode_text(tokenizer, whole, add_special_tokens=True)
    t = tokenize_record(record, tokenizer, eos_id=-1)
    parts = t.question + [i for s in t.steps for i in s] + t.answer[:-1]
    if parts == whole_ids:
        return True, f"ok ({len(parts)} tokens)"
    i = next((i for i, (a, b) in enumerate(zip(parts, whole_ids)) if a != b), min(len(parts), len(whole_ids)))
    return False, (f"parts differ from whole text at token {i}: "
                   f"parts {parts[i:i + 4]} vs whole {whole_ids[i:i + 4]} "
                   f"(around {tokenizer.decode(whole_ids[max(0, i - 2):i + 2])!r})")
