"""Synthetic grade-school word problems with GSM8k/iCoT-style calculator steps.

The embedded default data for the quickstart and the tests: small enough numbers for a 135M model to
learn, but not trivial (1-5 chained steps, several wordings per operation, some steps reuse an
earlier result rather than the previous one). Every step is `<<expr=result>>` with integer operands
and result; each step uses the previous step's result; the last result is the answer.
"""

import random
import re

from ..errors import UserError
from .records import Record

PEOPLE = [("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"),
          ("Omar", "he"), ("Lena", "she"), ("Ravi", "he"), ("Emma", "she"), ("Jack", "he"),
          ("Sofia", "she"), ("Ben", "he"), ("Aisha", "she"), ("Leo", "he"), ("Nora", "she"),
          ("Sam", "he"), ("Chloe", "she"), ("Hugo", "he"), ("Maya", "she"), ("Tom", "he")]
# (objects, container, containers)
THINGS = [("apples", "basket", "baskets"), ("marbles", "bag", "bags"), ("stickers", "sheet", "sheets"),
          ("cookies", "tray", "trays"), ("pencils", "box", "boxes"), ("shells", "bucket", "buckets"),
          ("cards", "pack", "packs"), ("stamps", "page", "pages"), ("beads", "jar", "jars"),
          ("books", "shelf", "shelves"), ("eggs", "carton", "cartons"), ("flowers", "bunch", "bunches"),
          ("coins", "purse", "purses"), ("crayons", "box", "boxes"), ("toy cars", "crate", "crates")]
MAX_VALUE = 999  # keep every intermediate result small

OPS = ("add", "sub", "mul", "div", "ref")  # "ref": a step that reuses the first result ("as many as ...")

# The wordings of each step kind. "story" reads like a grade-school problem; "terse" says the same in
# about half the tokens (more training steps a minute on a CPU). An opener is (text, ref phrases): the
# phrase later "ref" steps use to point back at the first result.
STYLES = {
    "story": {
        "mul": [("{N} has {a} {cs} of {obj} with {b} {obj} in each {c}.", ["in the {cs}"]),
                ("{N} buys {a} {cs} of {obj}. Each {c} holds {b} {obj}.", ["in the {cs}"])],
        "add": [("{N} has {a} {obj}. {F} gives {o} {b} more.", ["after {F}'s gift"]),
                ("{N} collects {a} {obj} on Monday and {b} {obj} on Tuesday.", ["after Tuesday", "at that point"])],
        "sub": [("{N} picks {a} {obj} and gives {b} of them to {F}.", ["after giving some to {F}"]),
                ("{N} had {a} {obj} but lost {b} of them.", ["after losing some"])],
        "div": [("{N} and {k1} friends share {a} {obj} equally.", ["right after the sharing"]),
                ("{a} {obj} are split equally among {k} children, and {N} is one of them.",
                 ["right after the sharing"])],
        "step_add": ["Then {p} buys {b} more {obj}.", "{F} gives {o} another {b} {obj}.",
                     "The next day {p} finds {b} more {obj}."],
        "step_sub": ["{P} gives {b} {obj} to {F}.", "{P} loses {b} of them on the way home.",
                     "{P} uses {b} {obj} for a school project."],
        "step_mul": ["By the end of the week {p} has {t} as many {obj} as before.",
                     "{P} trades them and gets back {t} as many {obj}."],
        "step_half": "{P} gives half of them to {F}.",
        "step_div": "{P} splits them equally into {k} {cs} and keeps only one {c}.",
        "step_add_ref": ["{F} gives {o} as many {obj} as {p} had {ref}.",
                         "{P} then buys as many {obj} as {p} had {ref}."],
        "step_sub_ref": "{P} then gives away as many {obj} as {p} had {ref}.",
        "question": ["How many {obj} does {N} have now?", "How many {obj} does {N} end up with?",
                     "How many {obj} does {N} have at the end?", "In the end, how many {obj} does {N} have?"],
    },
    "terse": {
        "mul": [("{N} has {a} {cs} of {b} {obj}.", ["in the {cs}"])],
        "add": [("{N} has {a} {obj}, gets {b} more.", ["after that"]),
                ("{N} finds {a} {obj}, then {b} more.", ["after that"])],
        "sub": [("{N} has {a} {obj}, gives {b} to {F}.", ["after that"]),
                ("{N} had {a} {obj}, lost {b}.", ["after that"])],
        "div": [("{N} and {k1} friends share {a} {obj}.", ["after sharing"])],
        "step_add": ["{P} gets {b} more.", "{P} finds {b} more."],
        "step_sub": ["{P} gives {b} to {F}.", "{P} loses {b}."],
        "step_mul": ["{P} ends with {t} as many."],
        "step_half": "{P} gives half away.",
        "step_div": "{P} keeps one of {k} equal parts.",
        "step_add_ref": ["{P} gets as many as {p} had {ref}."],
        "step_sub_ref": "{P} gives away as many as {p} had {ref}.",
        "question": ["How many {obj} now?"],
    },
}


def _opener(r, w, ops, m, t):
    """First step: builds the starting amount. Returns (sentence, step, value, ref phrase). Operand
    ranges shrink with a small bound `m` (--max-value) so small-number problems stay varied; `t` is
    the wording style's templates."""
    kind = r.choice([k for k in ("mul", "add", "sub", "div") if k in ops])

    def wording():  # drawn after the numbers, as the story wording always was (same data per seed)
        text, refs = r.choice(t[kind])
        return text, (refs[0] if len(refs) == 1 else r.choice(refs)).format(**w)

    if kind == "mul":
        a, b = r.randint(2, 9), r.randint(2, 12)
        text, ref = wording()
        return text.format(a=a, b=b, **w), f"<<{a}*{b}={a * b}>>", a * b, ref
    if kind == "add":
        a = r.randint(min(5, m // 4), min(40, m - 2))
        b = r.randint(2, min(30, m - a))
        text, ref = wording()
        return text.format(a=a, b=b, **w), f"<<{a}+{b}={a + b}>>", a + b, ref
    if kind == "sub":
        a = r.randint(min(10, m // 2), min(60, m))
        b = r.randint(1, a - 2)
        text, ref = wording()
        return text.format(a=a, b=b, **w), f"<<{a}-{b}={a - b}>>", a - b, ref
    k, q = r.randint(2, 5), r.randint(2, 15)
    text, ref = wording()
    return text.format(a=k * q, k=k, k1=k - 1, **w), f"<<{k * q}/{k}={q}>>", q, ref


def _step(r, w, v, first, ref, ops, max_value, t):
    """One more step on the current amount `v` (may reuse the first result). None if infeasible."""
    kinds = ["add", "add", "sub", "sub", "mul", "div", "add_ref", "sub_ref"]
    kind = r.choice([k for k in kinds if k.replace("add_", "").replace("sub_", "") in ops])
    if kind == "add":
        b = r.randint(2, min(30, max(2, max_value // 2)))
        return r.choice(t["step_add"]).format(b=b, **w), f"<<{v}+{b}={v + b}>>", v + b
    if kind == "sub" and v >= 3:
        b = r.randint(2, min(v - 1, 30))
        return r.choice(t["step_sub"]).format(b=b, **w), f"<<{v}-{b}={v - b}>>", v - b
    if kind == "mul" and 4 * v <= max_value + 1:
        k = r.randint(2, min(4, max_value // v))
        times = {2: "twice", 3: "three times", 4: "four times"}[k]
        return r.choice(t["step_mul"]).format(t=times, **w), f"<<{v}*{k}={v * k}>>", v * k
    if kind == "div":
        ks = [k for k in (2, 3, 4, 5) if v % k == 0 and v // k >= 1]
        if ks:
            k = r.choice(ks)
            text = t["step_half"] if k == 2 and r.random() < 0.5 else t["step_div"]
            return text.format(k=k, **w), f"<<{v}/{k}={v // k}>>", v // k
    if kind == "add_ref":
        text = r.choice(t["step_add_ref"])
        return text.format(ref=ref, **w), f"<<{v}+{first}={v + first}>>", v + first
    if kind == "sub_ref" and v > first:
        return t["step_sub_ref"].format(ref=ref, **w), f"<<{v}-{first}={v - first}>>", v - first
    return None


def _largest(step: str) -> int:
    return max(int(x) for x in re.findall(r"\d+", step))


def synth_record(r: random.Random, n_steps: int, ops=OPS, max_value: int = MAX_VALUE, style: str = "story"):
    """One problem with exactly `n_steps` steps, drawn from `r`, using the step kinds in `ops`, every
    intermediate result at most `max_value`, worded in `style` (a key of STYLES)."""
    t = STYLES[style]
    (name, p), (friend, _) = r.sample(PEOPLE, 2)
    obj, c, cs = r.choice(THINGS)
    w = dict(N=name, F=friend, p=p, P=p.capitalize(), o="her" if p == "she" else "him",
             obj=obj, c=c, cs=cs)
    while True:
        sentence, step, v, ref = _opener(r, w, ops, max_value, t)
        if _largest(step) > max_value:
            continue
        sentences, steps, first = [sentence], [step], v
        for _ in range(50 * n_steps):  # a dead end (e.g. only "mul" and a large value): start over
            if len(steps) == n_steps:
                break
            out = _step(r, w, v, first, ref, ops, max_value, t)
            if out is None or _largest(out[1]) > max_value:
                continue
            sentences.append(out[0])
            steps.append(out[1])
            v = out[2]
        if v > 0 and len(steps) == n_steps:
            break
    question = " ".join(sentences) + " " + r.choice(t["question"]).format(**w)
    return Record(question, steps, str(v))


def synth_records(n: int, seed: int = 0, min_steps: int = 1, max_steps: int = 5,
                  exclude=frozenset(), ops=OPS, max_value: int = MAX_VALUE, style: str = "story") -> list:
    """`n` synthetic records, deterministic for `seed`; step counts uniform in [min_steps, max_steps].
    Questions in `exclude` (e.g. the training set's, for a held-out split) are skipped. `ops` picks
    the step kinds (difficulty: add/sub only is easiest), `max_value` bounds every result, `style`
    picks the wording (STYLES)."""
    ops = tuple(ops)
    unknown = sorted(set(ops) - set(OPS))
    if unknown or not set(ops) & {"add", "sub", "mul", "div"}:
        raise UserError(f"--ops {','.join(ops)}: choose one or more of {','.join(OPS)} "
                        f"(at least one of add, sub, mul, div)")
    if not 10 <= max_value <= 100_000:
        raise UserError(f"--max-value must be in [10, 100000] (got {max_value})")
    if style not in STYLES:
        raise UserError(f"--style {style}: choose one of {', '.join(STYLES)}")
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    if not 1 <= min_steps <= max_steps:
        raise UserError(f"need 1 <= --min-steps <= --max-steps (got {min_steps}, {max_steps})")
    if max_steps > 10:
        raise UserError(f"--max-steps must be at most 10 (got {max_steps})")
    r = random.Random(seed)
    return draw_records(n, lambda: synth_record(r, r.randint(min_steps, max_steps), ops, max_value, style),
                        exclude)


def draw_records(n: int, draw, exclude=frozenset()) -> list:
    """`n` records from `draw()` whose questions are not in `exclude` (a held-out split)."""
    records, tries = [], 0
    while len(records) < n:
        tries += 1
        if tries > 20 * n + 1000:
            raise UserError(f"could not draw {n} problems that are not excluded (got {len(records)}): "
                            f"the excluded set covers most of this generator's questions")
        record = draw()
        if record.question not in exclude:
            records.append(record)
    return records
