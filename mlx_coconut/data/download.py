"""Dataset downloads: GSM8k (iCoT splits), ProsQA and ProntoQA from the official sources at pinned
commits, written as `{split}.json` record files."""

import json
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError
from .records import load_records, read_text, record_from_dict, save_records

# iCoT GSM8k splits at the commit the official COCONUT preprocessing pins.
ICOT_COMMIT = "e06a32ee5e4cd117171daeb4755d2a97ece62761"
GSM8K_URLS = {
    "train": f"https://media.githubusercontent.com/media/da03/Internalize_CoT_Step_by_Step/{ICOT_COMMIT}/data/gsm8k/train.txt",
    "valid": f"https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/{ICOT_COMMIT}/data/gsm8k/valid.txt",
    "test": f"https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/{ICOT_COMMIT}/data/gsm8k/test.txt",
}

# ProsQA: the official COCONUT repository's data/ at the commit its README and args/ are read at.
COCONUT_COMMIT = "27273cb8cca4bb763c041a63b036d0c3b7cbbb48"
PROSQA_URLS = {split: f"https://raw.githubusercontent.com/facebookresearch/coconut/{COCONUT_COMMIT}/data/prosqa_{split}.json"
               for split in ("train", "valid", "test")}
# ProntoQA is generated, not hosted: the official README runs the ProntoQA repository at this commit
# (below) and converts the 5hop_0shot_random.json it writes with preprocessing/prontoqa.py.
PRONTOQA_COMMIT = "f0145b867b3c106285ec9ea1941a3f6eb7c6162d"
PRONTOQA_REPO = f"https://github.com/asaparov/prontoqa/tree/{PRONTOQA_COMMIT}"
PRONTOQA_GENERATE = ("python run_experiment.py --model-name json --model-size dummy --ordering random "
                     "--num-trials 10000 --few-shot-examples 0 --ontology fictional --min-hops 5 "
                     "--max-hops 5 --hops-skip 1")
PRONTOQA_SPLITS = {"train": (0, 9000), "valid": (9000, 9200), "test": (9200, None)}  # official cut


def fetch(url, dest: Path, progress=None, timeout=30.0, hint: str = "") -> Path:
    """Download `url` to `dest` (removed again on failure). Any network failure is a one-line
    `UserError` naming the URL (+ `hint`: what to do with the file once fetched another way).

    `progress(label, total_bytes)` must return a context manager with `.update(n)` (click.progressbar
    fits); without a Content-Length there is no bar."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as f:
            total = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
            total = int(total) if total else None
            ctx = progress(url.rsplit("/", 1)[-1], total) if progress and total else None
            bar = ctx.__enter__() if ctx else None
            try:
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
    except (urllib.error.URLError, OSError, ValueError) as e:
        Path(dest).unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}){'; ' + hint if hint else ''}")
    return Path(dest)


def _download_splits(urls: dict, out_dir, splits, fmt: str, progress, timeout) -> dict:
    """Fetch each split's file, read it with our reader (validates it), write `{split}.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits:
        url = urls[split]
        raw = out_dir / f"{split}.{fmt}.part"
        fetch(url, raw, progress, timeout, hint=f"fetch that file another way and run `mlx-coconut data "
              f"convert {url.rsplit('/', 1)[-1]} --out {out_dir / (split + '.json')}`")
        try:
            records = load_records(raw, format="icot" if fmt == "txt" else "json")
        finally:
            raw.unlink(missing_ok=True)
        save_records(records, out_dir / f"{split}.json")
        counts[split] = len(records)
    return counts


def download_gsm8k(out_dir, splits=("train", "valid", "test"), progress=None, timeout=30.0) -> dict:
    """Download the pinned iCoT GSM8k splits and write `{split}.json`. Returns {split: n_records}."""
    return _download_splits(GSM8K_URLS, out_dir, splits, "txt", progress, timeout)


def download_prosqa(out_dir, splits=("train", "valid", "test"), progress=None, timeout=30.0) -> dict:
    """Download ProsQA from the official repository's data/ at COCONUT_COMMIT → `{split}.json`
    (the graph keys idx_to_symbol, edges, root, target, neg_target are kept)."""
    return _download_splits(PROSQA_URLS, out_dir, splits, "json", progress, timeout)


def prontoqa_records(source: dict, where: str = "ProntoQA source") -> list:
    """The official preprocessing/prontoqa.py: each entry's `test_example` becomes a record whose
    question is `question + " " + query`, whose steps are the chain of thought joined in pairs
    (`Fae is a zumpus. Zumpuses are rompuses.`: a fact and the rule applied to it) and whose answer
    is the label (`True` / `False`). Entries are kept in file order."""
    if not isinstance(source, dict) or not source:
        raise UserError(f"{where}: expected a JSON object of examples (run_experiment.py --model-name json)")
    records = []
    for key, entry in source.items():
        ex = entry.get("test_example") if isinstance(entry, dict) else None
        if not isinstance(ex, dict):
            raise UserError(f"{where}: entry {key!r} has no 'test_example' object")
        missing = [k for k in ("question", "query", "chain_of_thought", "answer") if k not in ex]
        if missing:
            raise UserError(f"{where}: entry {key!r}: test_example is missing {', '.join(missing)}")
        cot = ex["chain_of_thought"]
        if not isinstance(cot, list) or not all(isinstance(c, str) for c in cot):
            raise UserError(f"{where}: entry {key!r}: chain_of_thought must be a list of strings")
        steps = [" ".join(cot[i:i + 2]) for i in range(0, len(cot), 2)]
        records.append(record_from_dict({"question": ex["question"] + " " + ex["query"],
                                          "steps": steps, "answer": ex["answer"]},
                                         f"{where}: entry {key!r}", gsm8k_ok=False))
    return records


def download_prontoqa(out_dir, source=None, splits=("train", "valid", "test"), progress=None,
                      timeout=30.0) -> dict:
    """ProntoQA as the official recipe builds it: the generated `5hop_0shot_random.json` (a file or
    an http(s) URL) → records (`prontoqa_records`) → the official cut 9000 / 200 / rest →
    `{split}.json`. Returns {split: n_records}."""
    if not source:
        raise UserError(f"ProntoQA is generated, not hosted: clone {PRONTOQA_REPO}, run `{PRONTOQA_GENERATE}`"
                        f" there, then pass the 5hop_0shot_random.json it writes with --source")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, tmp = str(source), None
    if src.startswith(("http://", "https://")):
        tmp = fetch(src, out_dir / "5hop_0shot_random.json.part", progress, timeout,
                    hint="fetch it another way and pass the file with --source")
        src = tmp
    try:
        text = read_text(src)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}:{e.lineno}: invalid JSON ({e.msg})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    records = prontoqa_records(data, str(source))
    counts = {}
    for split in splits:
        lo, hi = PRONTOQA_SPLITS[split]
        part = records[lo:hi]
        if not part:
            raise UserError(f"{source}: {len(records)} examples leave the {split} split empty "
                            f"(official cut: train 0-8999, valid 9000-9199, test 9200-)")
        save_records(part, out_dir / f"{split}.json")
        counts[split] = len(part)
    return counts
