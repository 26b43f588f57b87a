"""Offline, deterministic teacher: stage-2 entity mentions -> sentences in the Table 2 format.

It gives the demo (and CI) a teacher that needs no network and speaks the LLM's output format, and it
is the "Hybrid-NER" baseline of Table 8: existence comes from stage 2's polarity, the words of [a]
are the modifiers written right before the entity in its clause (severity, side, anatomy), e.g.
"Mild left pleural effusion is seen." -> "There is mild left pleural effusion.".
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

Polarity = Literal["positive", "negative", "uncertain"]

MODEL_NAME = "rules-teacher-v1"
MAX_MODIFIERS = 4
# Words that end the modifier run before an entity: function words, verbs, cues and de-identification marks.
STOP_WORDS = frozenset(
    """a an the and or nor but of in at on with to for from by as into within over under than
    is are was were be been being has have had seen noted identified present demonstrated shows show
    showing suggest suggests suggesting there this that which these those any some other evidence sign signs
    again also still now otherwise no not without may might could possible possibly probable probably likely
    suspected suspicious questionable concern versus vs xxxx representing represent represents reflecting
    reflect reflects appearing appear appears remain remains remaining consistent compatible involving
    including demonstrating like such due""".split()
)
# Head forms used as adjectives ("calcified vasculature", "granulomatous disease") take the next word along.
_ADJECTIVE_ENDINGS = ("ed", "ic", "ous", "ar", "al", "ive")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*|[^\sA-Za-z0-9]")
_CLAUSE_BREAK = re.compile(r"[.;:,!?()]")


@dataclass(frozen=True)
class Mention:
    """One entity occurrence as stage 2 reports it (`start`/`end` are character offsets into the text)."""

    entity: str
    start: int
    end: int
    polarity: Polarity
    descriptors: tuple[str, ...] = ()


def entity_phrase(text: str, mention: Mention) -> str:
    """The entity as written plus up to MAX_MODIFIERS modifier words right before it in the same clause
    (and the noun after it when the entity is written as an adjective)."""
    if not (0 <= mention.start < mention.end <= len(text)):
        raise ValueError(f"mention {mention} lies outside the report text of length {len(text)}")
    head = text[mention.start : mention.end]
    before = _CLAUSE_BREAK.split(text[: mention.start])[-1]
    modifiers: list[str] = []
    for token in reversed(_TOKEN.findall(before)):
        if len(modifiers) == MAX_MODIFIERS or not token[0].isalnum() or token.lower() in STOP_WORDS:
            break
        modifiers.insert(0, token)
    words = [*modifiers, head]
    if head.lower().endswith(_ADJECTIVE_ENDINGS):
        after = _TOKEN.match(text[mention.end :].lstrip())
        if after and after.group()[0].isalpha() and after.group().lower() not in STOP_WORDS:
            words.append(after.group())
    return " ".join(words).lower()


def sentence_for(phrase: str, polarity: Polarity) -> str:
    if polarity == "negative":
        return f"There is no {phrase}."
    if polarity == "uncertain":
        return f"There may be {phrase}."
    return f"There is {phrase}."


_PRECEDENCE = {"positive": 0, "uncertain": 1, "negative": 2}


def merge_mentions(mentions: Iterable[Mention]) -> list[Mention]:
    """One mention per entity, in order of first appearance: a positive mention beats an uncertain one,
    which beats a negative one ("no new effusion ... small stable effusion" -> present)."""
    by_entity: dict[str, list[Mention]] = {}
    for m in sorted(mentions, key=lambda m: m.start):
        by_entity.setdefault(m.entity.lower(), []).append(m)
    return [min(ms, key=lambda m: (_PRECEDENCE[m.polarity], m.start)) for ms in by_entity.values()]


def distill(text: str, mentions: Sequence[Mention]) -> str:
    """The distilled report, one sentence per entity, newline-separated (the teacher's output format)."""
    sentences = (sentence_for(entity_phrase(text, m), m.polarity) for m in merge_mentions(mentions))
    return "\n".join(dict.fromkeys(sentences))  # "calcified vasculature" serves two entities: say it once


def mentions_by_study(table: pa.Table) -> dict[str, list[Mention]]:
    """Group an `entity_mentions` table (stage 2) into Mention lists per study, in text order."""
    out: dict[str, list[Mention]] = defaultdict(list)
    cols = table.select(["study_id", "entity", "start", "end", "polarity", "descriptors"]).to_pydict()
    for sid, ent, start, end, pol, desc in zip(*cols.values(), strict=True):
        out[sid].append(Mention(ent.lower(), start, end, pol, tuple(desc or ())))
    return dict(out)
