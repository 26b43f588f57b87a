"""Teacher/student response -> sentences -> (entities, certainty, severity, location), plus QC flags.

The target format (Table 2) is one entity per sentence, "There is [a] [b]." or "There may [a] [b].".
Certainty follows the cue rules of LLM.md §4: a negation cue makes the sentence `absent`, else a hedge
makes it `uncertain`, else `present`; negation wins over hedging ("there may be no effusion" is absent).
Severity and location are closed lexicons, so severities can be compared between teacher and student.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from models.text.entities import build_lexicon

Certainty = Literal["present", "absent", "uncertain"]

NEGATION = re.compile(r"\b(no|not|without|free of|resolved|absent|negative for|clear of)\b", re.I)
HEDGE = re.compile(
    r"\b(may|might|could|possible|possibly|probable|probably|likely|suspected|suspicious|questionable|"
    r"question of|concern for|cannot be (?:excluded|ruled out)|versus|vs)\b",
    re.I,
)
FORMAT = re.compile(r"^there\s+(is|are|may|might|could)\b.*[a-z].*\.$", re.I | re.S)
SEVERITY_BINS: dict[str, int] = {
    **dict.fromkeys(("trace", "minimal", "tiny", "subtle", "slight", "slightly", "minimally"), 1),
    **dict.fromkeys(("small", "mild", "mildly"), 2),
    **dict.fromkeys(("moderate", "moderately"), 3),
    **dict.fromkeys(("large", "severe", "severely", "extensive", "massive", "marked", "markedly"), 4),
}
LOCATION_WORDS = frozenset(
    "left right bilateral bilaterally bibasilar bibasal basilar basal base bases apical apex apices biapical "
    "upper lower middle mid lobe lingula lingular retrocardiac midline lateral medial anterior posterior "
    "diffuse focal peripheral central subsegmental".split()
)


class EntityFinder:
    """Which entities of a list a text names, with stage 2's surface forms (models/text/entities.py), so the
    teacher's sentences are matched exactly as the reports were."""

    def __init__(self, entities: Iterable[str]):
        lexicon = build_lexicon(sorted({e.lower() for e in entities}))
        by_entity: dict[str, list[str]] = {}
        for form, entity in lexicon.forms.items():
            by_entity.setdefault(entity, []).append(form)
        self.patterns = {
            e: re.compile(
                r"\b(" + "|".join(map(re.escape, sorted(forms, key=len, reverse=True))) + r")\b", re.I
            )
            for e, forms in by_entity.items()
        }

    def find(self, text: str) -> list[str]:
        """Entities in order of first appearance."""
        hits = [(m.start(), e) for e, p in self.patterns.items() if (m := p.search(text))]
        return [e for _, e in sorted(hits)]


@dataclass(frozen=True)
class ParsedSentence:
    text: str
    well_formed: bool  # starts with "There is/are/may ..." and ends with a period
    entities: tuple[str, ...]
    certainty: Certainty
    severity: tuple[str, ...]
    severity_bin: int | None  # highest bin of the severity words (a range maps to its top)
    location: tuple[str, ...]


def split_response(response: str) -> list[str]:
    """Lines and sentences of a response, with list markers ("1.", "-", "*") and blank lines removed."""
    out = []
    for line in response.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", line).strip()
        out += [s.strip() for s in re.split(r"(?<=\.)\s+(?=[A-Z])", line) if s.strip()]
    return out


def certainty_of(sentence: str) -> Certainty:
    if NEGATION.search(sentence):
        return "absent"
    if HEDGE.search(sentence):
        return "uncertain"
    return "present"


def parse_sentence(sentence: str, finder: EntityFinder) -> ParsedSentence:
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", sentence)]
    severity = tuple(w for w in words if w in SEVERITY_BINS)
    return ParsedSentence(
        text=sentence,
        well_formed=bool(FORMAT.match(sentence)),
        entities=tuple(finder.find(sentence)),
        certainty=certainty_of(sentence),
        severity=severity,
        severity_bin=max((SEVERITY_BINS[w] for w in severity), default=None),
        location=tuple(w for w in words if w in LOCATION_WORDS),
    )


def parse_response(response: str, finder: EntityFinder) -> list[ParsedSentence]:
    return [parse_sentence(s, finder) for s in split_response(response)]


def first_well_formed(parsed: Sequence[ParsedSentence]) -> dict[str, ParsedSentence]:
    """Entity -> the first well-formed sentence about it (the one the answer's reader takes)."""
    out: dict[str, ParsedSentence] = {}
    for p in parsed:
        if p.well_formed:
            for e in p.entities:
                out.setdefault(e, p)
    return out


def entity_certainties(parsed: Sequence[ParsedSentence]) -> dict[str, Certainty]:
    """Entity -> certainty from well-formed sentences; the first sentence about an entity wins."""
    return {e: p.certainty for e, p in first_well_formed(parsed).items()}


POLARITY_TO_CERTAINTY: dict[str, Certainty] = {
    "positive": "present",
    "negative": "absent",
    "uncertain": "uncertain",
}


_CONJUNCTION = re.compile(r"\b(and|or)\b|,", re.I)


def joins_entities(p: ParsedSentence) -> bool:
    return len(p.entities) > 1 and bool(_CONJUNCTION.search(p.text))


def qc_flags(
    parsed: Sequence[ParsedSentence],
    requested: Sequence[str],
    stage2_polarities: Mapping[str, set[str]],
    report_entities: Iterable[str] = (),
) -> list[str]:
    """Validation flags of one response, each "kind" or "kind:detail".

    - empty_response: nothing to parse
    - unparseable_line:<i>: sentence i is not in the "There is/may ..." format
    - multi_entity_sentence:<i>: sentence i joins entities with and/or/commas, which the prompt forbids
      (one phrase naming two, as in "normal cardiomediastinal contours", is fine)
    - hallucinated_entity:<e>: an entity the report never mentions
    - missing_entity:<e>: a requested entity with no well-formed sentence
    - polarity_disagrees:<e>: the sentence's certainty is not among stage 2's polarities for <e>
    """
    if not parsed:
        return ["empty_response"]
    flags = [f"unparseable_line:{i}" for i, p in enumerate(parsed) if not p.well_formed]
    flags += [
        f"multi_entity_sentence:{i}" for i, p in enumerate(parsed) if p.well_formed and joins_entities(p)
    ]
    in_report = {e.lower() for e in requested} | {e.lower() for e in report_entities}
    said = entity_certainties(parsed)
    mentioned = [e for p in parsed for e in p.entities]
    flags += [f"hallucinated_entity:{e}" for e in dict.fromkeys(mentioned) if e not in in_report]
    flags += [f"missing_entity:{e}" for e in requested if e.lower() not in said]
    for e, certainty in said.items():
        allowed = {POLARITY_TO_CERTAINTY[p] for p in stage2_polarities.get(e, set())}
        if allowed and certainty not in allowed:
            flags.append(f"polarity_disagrees:{e}")
    return flags


def distilled_text(parsed: Sequence[ParsedSentence]) -> str:
    """The well-formed sentences joined: what pre-training reads as T_d (format-breaking lines are
    dropped)."""
    return " ".join(p.text for p in parsed if p.well_formed)


def parsed_json(parsed: Sequence[ParsedSentence]) -> str:
    return json.dumps([asdict(p) for p in parsed], ensure_ascii=False)
