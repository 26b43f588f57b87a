"""How well the student answers like the teacher: entity-level agreement on held-out seed reports, next to
the trivial baseline that calls every entity absent, and the check that stops a student worse than asked."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from models.distill import parse
from models.distill.complete import AnswerScorer, EntityCompletion


def agreement(
    requested: Sequence[Sequence[str]],
    teacher: Sequence[str],
    system: Sequence[str],
    finder: parse.EntityFinder,
) -> dict[str, float | int]:
    """Entity-level agreement of `system` answers with `teacher` answers (LLM.md §4, polarity part).

    Pairs are (report, requested entity) for which the teacher wrote a well-formed sentence. A system answer
    without a well-formed sentence for the entity counts as wrong.
    """
    pairs = right = exact = covered = sentences = bad = reports_right = 0
    for entities, t_text, s_text in zip(requested, teacher, system, strict=True):
        t_parsed, s_parsed = parse.parse_response(t_text, finder), parse.parse_response(s_text, finder)
        t_cert, s_cert = parse.entity_certainties(t_parsed), parse.entity_certainties(s_parsed)
        t_sent = {e: p.text for e, p in parse.first_well_formed(t_parsed).items()}
        s_sent = {e: p.text for e, p in parse.first_well_formed(s_parsed).items()}
        sentences += len(s_parsed)
        bad += sum(not p.well_formed for p in s_parsed)
        all_right = True
        for e in entities:
            if e not in t_cert:
                continue
            pairs += 1
            covered += e in s_cert
            ok = s_cert.get(e) == t_cert[e]
            right += ok
            all_right &= ok
            exact += s_sent.get(e) is not None and norm(s_sent[e]) == norm(t_sent[e])
        reports_right += all_right
    return {
        "n_reports": len(teacher),
        "n_entities": pairs,
        "polarity_acc": right / max(pairs, 1),
        "exact_sentence_rate": exact / max(pairs, 1),
        "unparseable_rate": bad / max(sentences, 1),
        "coverage": covered / max(pairs, 1),
        "report_exact": reports_right / max(len(teacher), 1),
    }


def norm(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def all_absent_answer(entities: Sequence[str]) -> str:
    """The trivial baseline: every requested entity declared absent."""
    return "\n".join(f"There is no {e}." for e in entities)


class StudentTooWeakError(RuntimeError):
    """The student's held-out agreement is below `finetune_student.min_agreement`."""


def check_student(
    evals: Sequence[dict], min_agreement: float | None, log: logging.Logger | logging.LoggerAdapter
) -> None:
    """Log the student's held-out agreement beside the all-absent baseline; warn when it is below the
    baseline and raise StudentTooWeakError when it is below `min_agreement`.

    A student that does worse than answering every entity "absent" writes wrong certainties into the whole
    corpus, and bulk_distill cannot tell: this is the last point where the numbers are side by side.
    """
    by_system = {e["system"]: e for e in evals}
    student, baseline = by_system["student"]["polarity_acc"], by_system["all_absent"]["polarity_acc"]
    pairs = by_system["student"]["n_entities"]
    log.info(
        "held-out polarity agreement: student %.3f, all-absent baseline %.3f (%d entities)",
        student,
        baseline,
        pairs,
    )
    if min_agreement is not None and student < min_agreement:
        raise StudentTooWeakError(
            f"finetune_student: the student's held-out polarity agreement {student:.3f} is below "
            f"finetune_student.min_agreement {min_agreement:g} (all-absent baseline {baseline:.3f}, "
            f"{pairs} entities): the stage fails so that bulk_distill does not use this student; its outputs "
            "are in finetune_student/.attempt/"
        )
    if student < baseline:
        log.warning(
            "the student's held-out polarity agreement %.3f is below the all-absent baseline %.3f (%d "
            "entities): answering every entity 'absent' would do better, and bulk_distill will distil the "
            "corpus with this student; set finetune_student.min_agreement to stop here",
            student,
            baseline,
            pairs,
        )


def held_out_agreement(
    held_rows: Sequence[dict],
    generate: Callable[[Sequence[str]], list[str]],
    prompt_for: Callable[[str, Sequence[str]], str],
    finder: parse.EntityFinder,
    completion: tuple[AnswerScorer, int] | None,
) -> tuple[list[dict], dict[str, int] | None]:
    """The `student_eval` rows: the student's greedy answers (`student_greedy`), the answers the stage keeps
    (`student`: the greedy ones, or completed by `EntityCompletion` with (scorer, re-prompt rounds) when
    `completion` is given) and the all-absent baseline, each with its agreement and its reports per second.
    Also returns the completion's counts (None without completion)."""
    prompts, requested = [r["prompt"] for r in held_rows], [r["entities"] for r in held_rows]
    teacher = [r["answer"] for r in held_rows]
    t0 = time.perf_counter()
    outputs = generate(prompts)
    greedy = {"system": "student_greedy", **agreement(requested, teacher, outputs, finder)}
    evals = [greedy | {"reports_per_s": len(held_rows) / max(time.perf_counter() - t0, 1e-9)}]
    counts = None
    if completion is None:
        evals.append(evals[0] | {"system": "student"})
    else:
        scorer, rounds = completion
        complete = EntityCompletion(prompt_for, generate, scorer, rounds)
        texts, counts = complete([r["report"] for r in held_rows], requested, outputs, finder)
        rate = len(held_rows) / max(time.perf_counter() - t0, 1e-9)
        evals.append(
            {"system": "student", **agreement(requested, teacher, texts, finder), "reports_per_s": rate}
        )
    absent = [all_absent_answer(e) for e in requested]
    evals.append(
        {"system": "all_absent", **agreement(requested, teacher, absent, finder), "reports_per_s": 0.0}
    )
    return evals, counts
