"""A training run directory as a value: `Run.read(ref)` reads its `coconut.json` once; the record,
the checkpoint the reference chose, the settings and whether it holds LoRA adapters are then
answered from that value by training (`--init`, `--resume`), load, fuse, eval and the quickstart.

`RUN` selects the best checkpoint when the run recorded one (the official recipe picks checkpoints
by validation accuracy), else the latest; `RUN:best` and `RUN:latest` choose explicitly. The layout
of a run directory is described in checkpoint.py, which writes it.
"""

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .data import FormatConfig, SpecialIds
from .errors import UserError
from .files import read_json
from .tokens import eos_ids

RUN_FILE = "coconut.json"
RUN_FORMAT = 1
SELECTORS = ("best", "latest")
CKPT_NAME = re.compile(r"ckpt-\d+")


@dataclass
class Settings:
    """How the model was trained, hence how to prompt it (question only, or + k·c thoughts)."""
    mode: str = "cot"               # cot | coconut | no-cot | pause
    stage: int = 0
    c_thought: int = FormatConfig.c_thought
    max_latent_stage: int = FormatConfig.max_latent_stage
    pad_latent_to_max: bool = FormatConfig.pad_latent_to_max
    latent_ids: Optional[dict] = None  # {"start": id, "latent": id, "end": id} when the tokens exist
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict) -> "Settings":
        """The "settings" of a coconut.json (unknown keys ignored)."""
        known = {k: v for k, v in record.get("settings", {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def format_config(self, stage: Optional[int] = None) -> FormatConfig:
        """The prompt form a model trained with these settings expects (no uniform mixing at eval,
        as official). `stage` overrides the trained stage."""
        self.check_latent_tokens()
        return FormatConfig.from_settings(self, stage)

    def check_latent_tokens(self, where: str = ""):
        if self.mode in ("coconut", "pause") and not self.latent_ids:
            raise UserError(f"{where}trained in '{self.mode}' mode but the tokenizer has no latent tokens")

    def special_ids(self, tokenizer) -> SpecialIds:
        """Latent-token ids (-1 when the model has none, e.g. a plain converted model) and EOS."""
        lat = self.latent_ids or {}
        eos = tokenizer.eos_token_id
        eos = eos if eos is not None else eos_ids(tokenizer)[0]
        return SpecialIds(lat.get("start", -1), lat.get("latent", -1), lat.get("end", -1), int(eos))


def settings_dict(settings: Settings) -> dict:
    return asdict(settings)


def read_settings(path: Path) -> Settings:
    """The settings a model directory records (a fused model's coconut.json), else the defaults."""
    run_file = Path(path) / RUN_FILE
    if not run_file.exists():
        return Settings()
    return Settings.from_record(read_json(run_file))


def split_ref(ref) -> tuple:
    """`RUN`, `RUN:best` or `RUN:latest` -> (Path(RUN), "best" | "latest" | None)."""
    head, sep, tail = str(ref).rpartition(":")
    if sep and head and tail in SELECTORS:
        return Path(head), tail
    return Path(ref), None


@dataclass(frozen=True)
class Run:
    """A run directory read once: `record` is its coconut.json, `which` the checkpoint its reference
    selected ("best", "latest" or None: the best when recorded, else the latest)."""
    path: Path
    record: dict
    which: Optional[str] = None

    @classmethod
    def read(cls, ref) -> Optional["Run"]:
        """The run `ref` (RUN, RUN:best, RUN:latest) names, or None when it is not a run directory
        with a checkpoint (a model directory, a fused model, a run killed before its first one)."""
        path, which = split_ref(ref)
        run_file = path / RUN_FILE
        if not run_file.is_file():
            return None
        record = read_json(run_file)
        return cls(path, record, which) if record.get("checkpoint") else None

    @classmethod
    def open(cls, ref) -> "Run":
        run = cls.read(ref)
        if run is None:
            raise UserError(f"{ref}: not a run directory (no {RUN_FILE} with a checkpoint)")
        return run

    @property
    def ref(self) -> str:
        return f"{self.path}:{self.which}" if self.which else str(self.path)

    @property
    def lora(self) -> bool:
        return self.record.get("weights") == "lora"

    @property
    def config(self) -> dict:
        return self.record.get("config", {})

    @property
    def settings(self) -> Settings:
        return Settings.from_record(self.record)

    def selected(self, which: Optional[str] = None) -> "Run":
        """The same run with another checkpoint selected."""
        return Run(self.path, self.record, which)

    def checkpoint_name(self, which: Optional[str] = None) -> str:
        """The checkpoint sub-directory selected: `which` (or the reference's `:best` / `:latest`),
        else the best one when the run recorded a validation accuracy, else the latest."""
        which = which or self.which
        best = self.record.get("best")
        if which == "best" and not best:
            raise UserError(f"{self.ref}: no best checkpoint recorded (the run has no validation "
                            f"accuracy); use {self.path}:latest")
        if which == "latest" or not best:
            return self.record["checkpoint"]
        return best["checkpoint"]

    def checkpoint(self, which: Optional[str] = None) -> Path:
        name = self.checkpoint_name(which)
        # only a sub-directory of this run: an edited coconut.json must not load weights from elsewhere
        if not isinstance(name, str) or not CKPT_NAME.fullmatch(name):
            raise UserError(f"{self.path / RUN_FILE}: \"checkpoint\": {json.dumps(name)} is not a "
                            f"checkpoint of this run directory (expected a name like ckpt-0000120)")
        ckpt = self.path / name
        if ckpt.is_symlink() or not ckpt.is_dir():
            raise UserError(f"{self.ref}: {RUN_FILE} points at {name}, which does not exist")
        return ckpt

    def state(self, which: Optional[str] = None) -> Optional[dict]:
        """The selected checkpoint's state.json (step, epoch, batch, complete, data order)."""
        file = self.checkpoint(which) / "state.json"
        return read_json(file) if file.exists() else None


# by path, for callers holding only a path (tests, scripts): each reads coconut.json again


def read_run(path) -> Optional[dict]:
    """coconut.json of a run directory (one with a checkpoint), else None."""
    run = Run.read(path)
    return run.record if run else None


def is_run_dir(path) -> bool:
    return Run.read(path) is not None


def checkpoint_dir(path, which: Optional[str] = None) -> Path:
    return Run.open(path).checkpoint(which)
