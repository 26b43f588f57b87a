"""The student's training examples from the teacher's seed distillations: clean answers, entity subsets, and
the held-out split its agreement is measured on."""

from __future__ import annotations

import random
from collections.abc import Sequence

from models.distill import parse
from models.distill.complete import kept_sentences
from models.distill.student import student_prompt


def clean_answer(raw_response: str, finder: parse.EntityFinder) -> str:
    """The teacher's well-formed sentences, one per line (its output format), without malformed lines."""
    return "\n".join(p.text for p in parse.parse_response(raw_response, finder) if p.well_formed)


def entity_subset_rows(
    rows: Sequence[dict], copies: int, finder: parse.EntityFinder, seed: int
) -> list[dict]:
    """`copies` variants of each training row that request a random proper subset of its answer sentences.

    A student that only sees full entity lists can write a plausible list without reading it: the tiny demo
    student repeats common entities and skips rare ones. When the requested list varies and the answer follows
    it (the teacher answers "one by one", in list order), the list has to be read. The subset keeps the
    answer's sentence order; its entity list is the entities those sentences name, in the original list order.
    Only the sentences `kept_sentences` accepts take part (one per requested entity), so every subset answer
    is exactly what its list asks for.
    """
    rng = random.Random(seed)
    out = []
    for r in rows:
        sentences = [(line, finder.find(line)) for line in kept_sentences(r["answer"], r["entities"], finder)]
        if len(sentences) < 2:
            continue
        for c in range(copies):
            k = rng.randint(1, len(sentences) - 1)
            chosen = sorted(rng.sample(range(len(sentences)), k))
            named = {e for i in chosen for e in sentences[i][1]}
            entities = [e for e in r["entities"] if e in named]
            answer = "\n".join(sentences[i][0] for i in chosen)
            out.append(
                r
                | {
                    "study_id": f"{r['study_id']}#subset{c}",
                    "entities": entities,
                    "answer": answer,
                    "prompt": student_prompt(r["report"], entities),
                }
            )
    return out


def split_held_out(study_ids: Sequence[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(train, held-out) by a seeded shuffle; at least one of each when there are two or more reports."""
    ids = sorted(set(study_ids))
    if len(ids) < 2:
        raise ValueError(
            f"need at least 2 seed distillations to train and evaluate a student, got {len(ids)}"
        )
    random.Random(seed).shuffle(ids)
    n_held = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(ids[n_held:]), set(ids[:n_held])


def usable_seed_rows(rows: Sequence[dict], finder: parse.EntityFinder) -> tuple[list[dict], list[str]]:
    """Each seed row with its cleaned teacher `answer` and its student `prompt`; rows whose answer has no
    well-formed sentence are left out and their study ids returned (a student cannot learn from them)."""
    usable, unusable = [], []
    for r in rows:
        answer = clean_answer(r["raw_response"], finder)
        if not answer:
            unusable.append(r["study_id"])
            continue
        usable.append({**r, "answer": answer, "prompt": student_prompt(r["report"], r["entities"])})
    return usable, unusable
