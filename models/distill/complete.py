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
Steps 1-2 only need generation, so they also run against a vLLM server; step 3 needs token log-probabilities
of the prompt and runs with the in-process backend (`TransformersBackend.answer_logprobs`). Without a scorer
the remaining entities stay missing and QC flags them (bulk_distill re-sends such answers to the teacher).
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


def missing_entities(kept: Sequence[str], requested: Sequence[str], finder: parse.EntityFinder) -> list[str]:
    """Requested entities (first occurrence order) that no kept sentence names."""
    covered = {e.lower() for s in kept for e in finder.find(s)}
    return [e for e in dict.fromkeys(requested) if e.lower() not in covered]


def scored_sentences(
    prompt: str, kept: Sequence[str], missing: Sequence[str], scorer: AnswerScorer
) -> list[str]:
    """Step 3: for each missing entity, the form with the highest log p(kept + form | prompt).

    Each entity is scored after the kept sentences alone (not after the other completions), so one scorer call
    covers all of them.
    """
    if not missing:
        return []
    forms = list(FORMS.values())
    candidates = ["\n".join([*kept, f.format(entity=e)]) for e in missing for f in forms]
    scores = scorer(prompt, candidates)
    chosen = []
    for i, e in enumerate(missing):
        block = scores[i * len(forms) : (i + 1) * len(forms)]
        chosen.append(forms[max(range(len(forms)), key=block.__getitem__)].format(entity=e))
    return chosen


@dataclass(frozen=True)
class EntityCompletion:
    """Steps 1-3 of the module docstring around one student backend."""

    prompt_for: Callable[[str, Sequence[str]], str]  # (report, entities) -> the student's prompt
    generate: Callable[[Sequence[str]], list[str]]  # prompts -> greedy answers
    scorer: AnswerScorer | None  # None: entities still missing after re-prompting stay missing
    reprompt_rounds: int = 1

    def __call__(
        self,
        reports: Sequence[str],
        requested: Sequence[Sequence[str]],
        answers: Sequence[str],
        finder: parse.EntityFinder,
    ) -> tuple[list[str], dict[str, int]]:
        """Completed answers (input order) and counts: generated sentences kept / dropped, re-prompted,
        scored."""
        kept = [kept_sentences(a, r, finder) for a, r in zip(answers, requested, strict=True)]
        n_kept = sum(map(len, kept))
        n_generated = sum(len(parse.parse_response(a, finder)) for a in answers)
        stats = {"kept": n_kept, "dropped": n_generated - n_kept, "reprompted": 0, "scored": 0}
        for _ in range(self.reprompt_rounds):  # step 2, batched over the reports still missing something
            todo = [(i, m) for i, r in enumerate(requested) if (m := missing_entities(kept[i], r, finder))]
            if not todo:
                break
            replies = self.generate([self.prompt_for(reports[i], m) for i, m in todo])
            for (i, m), reply in zip(todo, replies, strict=True):
                new = kept_sentences(reply, m, finder)
                kept[i] += new
                stats["reprompted"] += len(new)
        if self.scorer is not None:  # step 3
            for i, (report, req) in enumerate(zip(reports, requested, strict=True)):
                missing = missing_entities(kept[i], req, finder)
                chosen = scored_sentences(self.prompt_for(report, req), kept[i], missing, self.scorer)
                kept[i] += chosen
                stats["scored"] += len(chosen)
        return ["\n".join(k) for k in kept], stats
