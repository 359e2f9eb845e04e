"""Records: the official COCONUT schema `{"question": str, "steps": [str], "answer": str}` and the
readers and writer of data files.

Extra keys (e.g. ProsQA's graph) are kept in `Record.extra`. Readers accept three formats, detected
from the file:

- `icot`:  Internalize-CoT text, one `question||<<a>> <<b>> #### answer` per line
- `json`:  the official JSON list of records (GSM8k from the official preprocessing, ProsQA, ...)
- `gsm8k`: the original GSM8k jsonl `{"question", "answer"}` whose answer holds `<<...>>` calculator
           annotations (taken in order as the steps) and ends with `#### answer`. A jsonl whose lines
           already carry `steps` is read as official records.

Two deliberate normalisations (same for every reader, documented in docs/data.md):

- Step-less records: the official preprocessing turns an empty iCoT step field into `steps == [""]`,
  which trains a blank line after the question. We drop empty/whitespace-only steps, so such a record
  has `steps == []` and is rendered `question\\n### answer`.
- Answers with thousands separators (`1,000`) become `1000`: GSM8k answers are numbers and the
  official evaluation compares `answer.replace(",", "")` anyway, so the model is trained on the form it
  is scored against. Only answers that look like a comma-grouped number are touched; ProsQA sentence
  answers are left alone.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import UserError

FORMATS = ("icot", "json", "gsm8k")

_COMMA_NUMBER = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_ANNOTATION = re.compile(r"<<(.*?)>>")


@dataclass
class Record:
    question: str
    steps: list
    answer: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The official schema (extra keys after the three core ones)."""
        return {"question": self.question, "steps": list(self.steps), "answer": self.answer, **self.extra}


def normalize_answer(answer: str) -> str:
    """Strip whitespace; `1,000` -> `1000` (only for comma-grouped numbers)."""
    answer = answer.strip()
    if _COMMA_NUMBER.match(answer):
        answer = answer.replace(",", "")
    return answer


def _clean_steps(steps) -> list:
    # Official preprocessing yields [""] for a step-less line; we keep no empty steps.
    return [s.strip() for s in steps if s.strip()]


def parse_icot_line(line: str, where: str) -> Record:
    """`question||<<a>> <<b>> #### answer` -> Record. `where` is `file:line` for errors."""
    if "||" not in line:
        raise UserError(f"{where}: expected 'question||steps #### answer' but found no '||'")
    question, rest = line.rsplit("||", 1)
    if "####" not in rest:
        raise UserError(f"{where}: expected '#### answer' after the steps but found no '####'")
    steps_text, answer = rest.split("####", 1)
    if not question.strip():
        raise UserError(f"{where}: empty question")
    answer = normalize_answer(answer)
    if not answer:
        raise UserError(f"{where}: empty answer after '####'")
    return Record(question.strip(), _clean_steps(steps_text.split()), answer)


def parse_gsm8k_answer(text: str, where: str) -> tuple:
    """Original GSM8k answer -> (steps, answer): `<<...>>` annotations in order, text after `####`."""
    if "####" not in text:
        raise UserError(f"{where}: GSM8k answer has no '#### answer' line")
    body, answer = text.rsplit("####", 1)
    steps = [f"<<{a}>>" for a in _ANNOTATION.findall(body)]
    answer = normalize_answer(answer)
    if not answer:
        raise UserError(f"{where}: empty answer after '####'")
    return _clean_steps(steps), answer


def record_from_dict(d, where: str, gsm8k_ok: bool) -> Record:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object with question/steps/answer, got {type(d).__name__}")
    for key in ("question", "answer"):
        if key not in d:
            raise UserError(f"{where}: record is missing the key '{key}'")
    question, answer = d["question"], d["answer"]
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: 'question' must be a non-empty string")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise UserError(f"{where}: 'answer' must be a string")
    extra = {k: v for k, v in d.items() if k not in ("question", "steps", "answer")}
    if "steps" not in d:
        if not gsm8k_ok:
            raise UserError(f"{where}: record is missing the key 'steps'")
        steps, answer = parse_gsm8k_answer(answer, where)
        return Record(question.strip(), steps, answer, extra)
    steps = d["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise UserError(f"{where}: 'steps' must be a list of strings")
    answer = normalize_answer(answer)
    if not answer:
        raise UserError(f"{where}: empty answer")
    return Record(question.strip(), _clean_steps(steps), answer, extra)


def detect_format(path, text: str) -> str:
    """`json` for a list, `gsm8k` for one object per line, `icot` for `||` text."""
    head = text.lstrip()[:1]
    if head == "[":
        return "json"
    if head == "{":
        return "gsm8k"
    first = next((l for l in text.splitlines() if l.strip()), "")
    if "||" in first:
        return "icot"
    raise UserError(
        f"{path}:1: cannot detect the format (not a JSON list, not jsonl, no '||' on the first line); "
        f"use --format {{{','.join(FORMATS)}}}"
    )


def read_text(path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a data file")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 text")


def _load_json_list(path, text: str) -> list:
    """Parse a top-level JSON list element by element so errors can name the line of the record."""
    dec = json.JSONDecoder()
    records = []
    pos = text.index("[") + 1
    line, counted = 1, 0

    def line_at(i):
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def skip_ws(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return records
    while True:
        pos = skip_ws(pos)
        where = f"{path}:{line_at(pos)}"
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})")
        records.append(record_from_dict(obj, f"{where} (record {len(records) + 1})", gsm8k_ok=False))
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                raise UserError(f"{path}:{line_at(pos)}: unexpected text after the closing ']'")
            return records
        raise UserError(f"{path}:{line_at(min(pos, len(text)))}: invalid JSON list (expected ',' or ']')")


def load_records(path, format: Optional[str] = None) -> list:
    """Read a data file into a list of `Record`s (format auto-detected unless given).

    Raises `UserError` naming the file and line for malformed input or an empty file.
    """
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path}:1: empty file, no records")
    if format is None:
        format = detect_format(path, text)
    if format not in FORMATS:
        raise UserError(f"unknown format '{format}' (choose from {', '.join(FORMATS)})")
    records = []
    if format == "json":
        if text.lstrip()[:1] != "[":
            raise UserError(f"{path}:1: expected a JSON list of records")
        records = _load_json_list(path, text)
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            if format == "icot":
                records.append(parse_icot_line(line, where))
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: invalid JSON ({e.msg})")
                records.append(record_from_dict(obj, where, gsm8k_ok=True))
    if not records:
        raise UserError(f"{path}:1: no records found")
    return records


def save_records(records, path) -> None:
    """Write the official JSON list, one record per line (so errors can name a line)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(r.to_json(), ensure_ascii=False) for r in records)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("[\n" + body + "\n]\n", encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves neither a temp file nor a torn output
        raise
