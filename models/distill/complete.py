"""Entity-complete decoding: one sentence per requested entity, every one of them decided by the student.

The prompt asks for "conclusions for the entities mentioned above one by one". A small student decodes
greedily into loops: it repeats some entities and never reaches others (the tiny demo student covers ~60% of
the requested entities), and a missing sentence is a wrong answer for that entity (LLM.md §4). So, after free
greedy decoding:

1. keep the first well-formed sentence about each requested entity and drop repeats, malformed lines and
   sentences about entities nobody asked for;
2. re-prompt: ask the student again, with the same Table 2 prompt listing only the still-missing entities
   (`reprompt_rounds` times), and keep what it now says about them;
3. score: for every entity still without a sentence, append whichever Table 2 form - "There is {e}." /
   "There is no {e}." / "There may be {e}." - the student gives the highest log-likelihood after the full
   prompt and the kept sentences.

Every certainty comes from the student's own reading of the report; no teacher or stage-2 label is consulted.
Steps 1-2 only need generation, so they also run against a vLLM server; step 3 needs token log-probabilities of
the prompt and runs with the in-process backend (`TransformersBackend.answer_logprobs`). Without a scorer the
remaining entities stay missing and QC flags them (bulk_distill re-sends such answers to the teacher).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from models.distill import parse

FORMS: dict[parse.Certainty, str] = {
    "present": "There is {entity}.",
    "absent": "There is no {entity}.",
    "uncertain": "There may be {entity}.",
}

# (prompt, answer texts) -> log p(answer | prompt) for each answer text, from the student.
AnswerScorer = Callable[[str, Sequence[str]], list[float]]


@dataclass(frozen=True)
class Completed:
    text: str  # one sentence per line, generated ones first, then the completed ones in request order
    n_kept: int  # generated sentences kept
    n_dropped: int  # generated sentences dropped (repeats, malformed, unrequested entities)
    n_completed: int  # entities whose sentence was chosen by scoring


def kept_sentences(answer: str, requested: Sequence[str], finder: parse.EntityFinder) -> list[str]:
    """The first well-formed sentence about each requested entity, in answer order.

    A sentence is kept only if every entity it names was requested and none of them has a sentence yet, so
    repeats, loops ("compared compared ...") and invented entities go.
    """
    wanted, seen, kept = {e.lower() for e in requested}, set(), []
    for p in parse.parse_response(answer, finder):
        names = {e.lower() for e in p.entities}
        if p.well_formed and names and names <= wanted and not names & seen:
            kept.append(p.text)
            seen |= names
    return kept


def complete_answer(
    prompt: str,
    requested: Sequence[str],
    answer: str,
    finder: parse.EntityFinder,
    scorer: AnswerScorer,
) -> Completed:
    """`answer` with repeats dropped and every missing requested entity completed by likelihood (step 3)."""
    kept = kept_sentences(answer, requested, finder)
    covered = {e.lower() for s in kept for e in finder.find(s)}
    missing = [e for e in dict.fromkeys(requested) if e.lower() not in covered]
    n_generated = len(parse.parse_response(answer, finder))
    if not missing:
        return Completed("\n".join(kept), len(kept), n_generated - len(kept), 0)
    forms = list(FORMS.values())
    candidates = ["\n".join([*kept, f.format(entity=e)]) for e in missing for f in forms]
    scores = scorer(prompt, candidates)
    chosen = []
    for i, e in enumerate(missing):
        block = scores[i * len(forms) : (i + 1) * len(forms)]
        chosen.append(forms[max(range(len(forms)), key=block.__getitem__)].format(entity=e))
    return Completed("\n".join(kept + chosen), len(kept), n_generated - len(kept), len(chosen))


@dataclass(frozen=True)
class EntityCompletion:
    """Steps 2-3 of the module docstring around one student backend."""

    prompt_for: Callable[[str, Sequence[str]], str]  # (report, entities) -> the student's prompt
    generate: Callable[[Sequence[str]], list[str]]  # prompts -> greedy answers
    scorer: AnswerScorer | None  # None: entities still missing after re-prompting stay missing
    reprompt_rounds: int = 1

    def missing(self, kept: Sequence[str], requested: Sequence[str], finder: parse.EntityFinder) -> list[str]:
        covered = {e.lower() for s in kept for e in finder.find(s)}
        return [e for e in dict.fromkeys(requested) if e.lower() not in covered]

    def reprompt(
        self, reports: Sequence[str], requested: Sequence[Sequence[str]], answers: Sequence[str],
        finder: parse.EntityFinder,
    ) -> tuple[list[str], int]:  # fmt: skip
        """Answers with the sentences that re-prompting for the missing entities added; and how many it added."""
        kept = [kept_sentences(a, r, finder) for a, r in zip(answers, requested, strict=True)]
        added = 0
        for _ in range(self.reprompt_rounds):
            todo = [(i, m) for i, r in enumerate(requested) if (m := self.missing(kept[i], r, finder))]
            if not todo:
                break
            replies = self.generate([self.prompt_for(reports[i], m) for i, m in todo])
            for (i, m), reply in zip(todo, replies, strict=True):
                new = kept_sentences(reply, m, finder)
                kept[i] += new
                added += len(new)
        return ["\n".join(k) for k in kept], added

    def __call__(
        self, reports: Sequence[str], requested: Sequence[Sequence[str]], answers: Sequence[str],
        finder: parse.EntityFinder,
    ) -> tuple[list[str], dict[str, int]]:  # fmt: skip
        """Completed answers (input order) and counts: generated sentences kept / dropped, re-prompted, scored."""
        first = [kept_sentences(a, r, finder) for a, r in zip(answers, requested, strict=True)]
        n_generated = sum(len(parse.parse_response(a, finder)) for a in answers)
        texts, added = self.reprompt(reports, requested, answers, finder)
        stats = {"kept": sum(map(len, first)), "dropped": n_generated - sum(map(len, first)), "reprompted": added,
                 "scored": 0}  # fmt: skip
        if self.scorer is not None:
            done = [
                complete_answer(self.prompt_for(rep, req), req, text, finder, self.scorer)
                for rep, req, text in zip(reports, requested, texts, strict=True)
            ]
            texts = [d.text for d in done]
            stats["scored"] = sum(d.n_completed for d in done)
        return texts, stats
