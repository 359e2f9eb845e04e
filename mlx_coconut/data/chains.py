"""Synthetic pointer chasing: follow k links through a shuffled cycle of words.

A task whose steps are serial by nature: hop t needs hop t-1's node before it can look up the next
link. A transformer's forward pass has a fixed depth, so extra positions with fixed inputs (pause
tokens) add width, not depth; a continuous thought adds a whole forward pass per thought. The
miniature of the paper's ProsQA finding (latent reasoning beats written reasoning on graph search).

    question: "Links: cat to dog, sun to red, dog to sun, red to cat. From cat, 3 steps?"
    steps:    ["cat to dog", "dog to sun", "sun to red"]
    answer:   "red"

Every node has exactly one outgoing and one incoming link (one cycle through all nodes, listed in a
random order), so nothing but following the links finds the answer: no node is special by position
or by degree. Every word is one token in the SmolLM2 and Llama 3 vocabularies, with and without a
leading space.
"""

import random

from ..errors import UserError
from .records import Record
from .synth import draw_records

WORDS = ("cat", "dog", "sun", "red", "fox", "owl", "bee", "pig", "hen", "ant", "ram", "bat", "cod", "ape",
         "box", "cup", "hat", "pen", "car", "bus", "map", "key", "bag", "bed")
MAX_HOPS = 10


def chain_record(r: random.Random, hops: int, nodes: int) -> Record:
    """One question: a random cycle through `nodes` words, its links shuffled, `hops` links to follow
    from a random start."""
    cycle = r.sample(WORDS, nodes)
    links = [(cycle[i], cycle[(i + 1) % nodes]) for i in range(nodes)]
    successor = dict(links)
    r.shuffle(links)
    start = r.choice(cycle)
    steps, node = [], start
    for _ in range(hops):
        steps.append(f"{node} to {successor[node]}")
        node = successor[node]
    question = ("Links: " + ", ".join(f"{a} to {b}" for a, b in links) +
                f". From {start}, {hops} step{'s' if hops > 1 else ''}?")
    return Record(question, steps, node)


def chain_records(n: int, seed: int = 0, min_hops: int = 1, max_hops: int = 3, nodes: int = 6,
                  exclude=frozenset()) -> list:
    """`n` pointer-chasing records, deterministic for `seed`; hop counts uniform in
    [min_hops, max_hops]; questions in `exclude` (a held-out split's training set) are skipped."""
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    if not 1 <= min_hops <= max_hops <= MAX_HOPS:
        raise UserError(f"need 1 <= --min-steps <= --max-steps <= {MAX_HOPS} (got {min_hops}, {max_hops})")
    if not max_hops < nodes <= len(WORDS):
        raise UserError(f"--nodes must be more than --max-steps ({max_hops}) and at most {len(WORDS)} "
                        f"(got {nodes}): a walk must not come back to its start")
    r = random.Random(seed)
    return draw_records(n, lambda: chain_record(r, r.randint(min_hops, max_hops), nodes), exclude)
