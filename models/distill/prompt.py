"""The teacher prompt of ECAMP Table 2, rendered for one report, and its content hash.

The wording below is Table 2 of the paper, word for word (including its grammar), because the
distillations of the paper were produced with exactly this text. Only the PDF's line wrapping is
undone. The hash covers everything that determines the teacher's answer (messages + generation
parameters), so it is a safe cache key: same hash, same request, never paid twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.distill.rules_teacher import Mention

SYSTEM_PROMPT = "You are a knowledgeable and veteran doctor."

INSTRUCTION = (
    "Please help me analysis the medical reports and conclude them briefly. Now, I will give you a medical "
    "report, as well as the mentioned entities. Please write brief and clear conclusions according to the "
    "reports as the following format:\n"
    "'There is [a] [b].': when you are sure whether the entity exists in the report, or\n"
    "'There may [a] [b].': when you are not sure whether the entity exists in the report.\n"
    "[a] represents adjective words describing the severeness or existence of the entity [b]. Please "
    "generate "
    "conclusions for the entities mentioned above one by one, according to the format and do not generate "
    "other words. Please keep only one entity in a sentence, there is no need of using 'and' or 'or' to "
    "connect two or more words."
)

ONE_SHOT_TEMPLATE = (
    "—Example—\n"
    "Report: As compared to ~, the lung volumes have slightly decreased. Signs of mild over inflation and "
    "moderate pleural effusion persist. Elongation of the descending aorta.\n"
    "Entities: aorta, inflation, effusion\n"
    "Conclusion:\n"
    "There is moderate pleural effusion.\n"
    "There is mild over inflation.\n"
    "There is descending aorta.\n"
    "—Example END—\n"
    "Given the report: {report}\n"
    "Entities: {entity}.\n"
    "Conclusion:"
)

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English; no tokenizer download is allowed at run time
MESSAGE_OVERHEAD_TOKENS = 4  # role + separators per chat message (OpenAI's published counting recipe)


def build_messages(report: str, entities: Sequence[str]) -> list[dict[str, str]]:
    """Table 2 as chat messages: system, instruction, one-shot example with the report filled in."""
    report = " ".join(report.split())
    if not report:
        raise ValueError("cannot build a teacher prompt for an empty report")
    last = ONE_SHOT_TEMPLATE.format(report=report, entity=", ".join(entities))
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": INSTRUCTION},
        {"role": "user", "content": last},
    ]


def prompt_hash(messages: Sequence[dict[str, str]], temperature: float, max_tokens: int) -> str:
    """sha256 (24 hex chars) of the canonical request: messages and the parameters that change the answer."""
    payload = {"messages": list(messages), "temperature": float(temperature), "max_tokens": int(max_tokens)}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]


def estimate_tokens(text: str) -> int:
    """Token estimate for budgeting and rate limits (ceil(chars / 4)); an over-estimate for report English."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    return sum(estimate_tokens(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in messages)


def split_sentences(text: str) -> list[str]:
    """Sentence split on '.', '!' or '?' followed by white space (reports rarely use abbreviations)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def render_report(findings_sentences: Sequence[str], impression: str) -> str:
    """A report as the teacher reads it: findings then impression, as `Report.text` joins them, so a
    truncated prompt differs from the full one only by the sentences or words it lost."""
    return " ".join(p for p in (" ".join(findings_sentences), impression) if p)


def fit_report(
    findings: str, impression: str, entities: Sequence[str], max_prompt_tokens: int
) -> tuple[str, bool]:
    """The report text to send (`render_report`), shortened to fit `max_prompt_tokens`; returns (text,
    truncated).

    FINDINGS lose sentences from the end first, because the IMPRESSION is the radiologist's own summary
    and carries the diagnoses; only if the impression alone is too long is it cut word by word (to 3/4 of
    its words, again and again). The result is the longest candidate of each kind that fits; since the
    prompt estimate only grows with the report, `largest_fitting` finds it in O(log n) renders of texts
    no longer than about twice the result, instead of one render of the whole text per dropped sentence
    (a 5 MB report took ~45 min that way; now the sentence split dominates, see bench/truncate.py).
    """
    findings_sents, impression_sents = split_sentences(findings), split_sentences(impression)
    impression_text = " ".join(impression_sents)
    render = render_report

    def fits(text: str) -> bool:
        return bool(text) and estimate_prompt_tokens(build_messages(text, entities)) <= max_prompt_tokens

    text = render(findings_sents, impression_text)
    if not text:
        raise ValueError("report has neither findings nor impression")
    if fits(text):
        return text, False
    kept = largest_fitting(
        range(1, len(findings_sents)), lambda n: fits(render(findings_sents[:n], impression_text))
    )
    if kept is None and findings_sents and fits(render([], impression_text)):
        kept = 0  # no FINDINGS at all (with no impression, this is empty text and fails on its own)
    if kept is not None:
        return render(findings_sents[:kept], impression_text), True
    words = impression_text.split()
    cuts = [len(words)]
    while cuts[-1] > 1:
        cuts.append(max(1, cuts[-1] * 3 // 4))
    kept = largest_fitting(cuts[:0:-1], lambda n: fits(render([], " ".join(words[:n]))))
    if kept is not None:
        return render([], " ".join(words[:kept])), True
    raise ValueError(
        f"max_prompt_tokens={max_prompt_tokens} is smaller than the fixed prompt itself "
        f"({estimate_prompt_tokens(build_messages('x', entities))} tokens); raise it"
    )


def largest_fitting(sizes: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of the ascending `sizes` with fits(size), or None; `fits` must hold up to some size and
    fail above it. Gallops from the small end, then bisects: O(log n) calls, none far above the answer."""
    # sizes[low] fits (-1: none yet); sizes[high] fails or is past the end.
    low, high, step = -1, len(sizes), 1
    while low + step < high and fits(sizes[low + step]):
        low, step = low + step, step * 2
    high = min(high, low + step)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(sizes[middle]):
            low = middle
        else:
            high = middle
    return sizes[low] if low >= 0 else None


def ordered_entities(mentions: Sequence[Mention]) -> list[str]:
    """Entities in the order the report first mentions them (the order the teacher answers in)."""
    return list(dict.fromkeys(m.entity for m in sorted(mentions, key=lambda m: m.start)))


def prompt_report(report: dict, entities: list[str], max_prompt_tokens: int) -> tuple[str, bool]:
    """The report text to send: the full text when the prompt fits, else FINDINGS-first truncation."""
    if estimate_prompt_tokens(build_messages(report["text"], entities)) <= max_prompt_tokens:
        return report["text"], False
    return fit_report(report["findings"], report["impression"], entities, max_prompt_tokens)
