"""Negation and uncertainty cues: the one cue table behind both places that decide negation in a report.

* `models.text.entities` (stage 2) decides the polarity of each entity MENTION: is the finding affirmed,
  denied or hedged? A cue there has a scope: a "pre" cue governs the entities after it up to the end of its
  clause, a "post" cue the entities shortly before it, the nearest cue wins and a pseudo cue ("no change")
  is a cue with no effect (NegEx/ConText; details in that module).
* `models.text.masking` (MLM, Eq. 3) decides which descriptor WORDS are negative: the paper re-weights the
  pieces of the negation words themselves ("no", "without", "there is no"), whatever else describes the
  entity ("pleural" in "no pleural effusion" is an ordinary descriptor although the effusion is denied). Its
  scope is therefore the cue's own words, on WordPiece ids: the words of a negating cue (`negating_phrases`)
  that are not also inside a longer cue of another kind (`non_negating_phrases`: "no change",
  "can not be excluded"), which is what the entity matcher's longest-phrase rule decides at that spot.

Both read their phrases from the table below, so a cue added here changes both decisions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

# Lower case; a space matches any run of whitespace. Direction says where the entity is: "pre" cues govern
# entities after them up to the clause end, "post" cues entities shortly before them in the clause, "both"
# either way. Longest phrase wins at a position, so "no change" (pseudo) beats "no".
NEGATION_PRE = (
    "no",
    "not",
    "without",
    "free of",
    "clear of",
    "negative for",
    "absence of",
    "absent",
    "resolution of",
    "there is no",
    "there are no",
    "there was no",
    "there were no",
    "rather than",
    "removal of",
    "no evidence of",
    "no signs of",
    "no sign of",
    "no findings of",
    "without evidence of",
    "there is no evidence of",
)
NEGATION_POST = (
    "resolved",
    "has resolved",
    "have resolved",
    "cleared",
    "has cleared",
    "have cleared",
    "removed",
    "been removed",
    "ruled out",
    "is absent",
    "are absent",
    "not seen",
    "not identified",
    "not visualized",
    "not appreciated",
    "not evident",
    "not present",
    "not demonstrated",
    "not detected",
)
NEGATION_BOTH = (
    "no longer",
    "no longer seen",
    "no longer visualized",
    "no longer present",
    "no longer evident",
)
UNCERTAIN_PRE = (
    "possible",
    "possibly",
    "probable",
    "probably",
    "likely",
    "unlikely",
    "questionable",
    "question of",
    "suspicious for",
    "suspected",
    "suspicion for",
    "suspicion of",
    "suggestive of",
    "suggests",
    "suggesting",
    "concern for",
    "concerning for",
    "worrisome for",
    "may",
    "might",
    "could",
    "cannot exclude",
    "can not exclude",
    "cannot rule out",
    "can not rule out",
    "not exclude",
    "rule out",
    "to exclude",
    "evaluate for",
    "assess for",
    "equivocal",
    "presumed",
    "differential includes",
    "there may be",
    "there might be",
    "there could be",
)
UNCERTAIN_POST = (
    "cannot be excluded",
    "can not be excluded",
    "cannot be ruled out",
    "can not be ruled out",
    "not excluded",
    "not be excluded",
    "not ruled out",
    "not be ruled out",
    "is possible",
    "are possible",
    "is suspected",
    "are suspected",
    "is questioned",
    "is not excluded",
    "may be present",
    "is likely",
)
UNCERTAIN_BOTH = ("versus", "vs")
PSEUDO = (
    "not only",
    "no change",
    "no changes",
    "no significant change",
    "no interval change",
    "no significant interval change",
    "no increase",
    "no increased",
    "no decrease",
    "no worsening",
    "no further change",
    "not changed",
    "not significantly changed",
    "without change",
    "without significant change",
    "without interval change",
    "not necessarily",
    "gram negative",
    "not resolved",
    "not completely resolved",
    "not fully resolved",
    "incompletely resolved",
    "partially resolved",
    "nearly resolved",
    "almost resolved",
    "not cleared",
    "not removed",
)
TERMINATORS = (
    "but",
    "however",
    "although",
    "though",
    "except",
    "aside from",
    "apart from",
    "other than",
    "whereas",
    "which",
    "there is",
    "there are",
    "there was",
    "there were",
)
# "non-calcified granuloma": "non" negates the one word it is attached to, nothing further.
PREFIX_NEGATION = ("non",)

CueKind = Literal["negative", "uncertain", "pseudo", "terminator", "prefix"]
Direction = Literal["pre", "post", "both"]


@dataclass(frozen=True)
class Cue:
    phrase: str
    kind: CueKind
    direction: Direction = "pre"


def default_cues() -> tuple[Cue, ...]:
    """The cue table above as Cue records (the entity matcher's callers may extend or replace it)."""
    groups: list[tuple[Iterable[str], CueKind, Direction]] = [
        (NEGATION_PRE, "negative", "pre"),
        (NEGATION_POST, "negative", "post"),
        (NEGATION_BOTH, "negative", "both"),
        (UNCERTAIN_PRE, "uncertain", "pre"),
        (UNCERTAIN_POST, "uncertain", "post"),
        (UNCERTAIN_BOTH, "uncertain", "both"),
        (PSEUDO, "pseudo", "pre"),
        (TERMINATORS, "terminator", "pre"),
        (PREFIX_NEGATION, "prefix", "pre"),
    ]
    return tuple(Cue(p, kind, d) for phrases, kind, d in groups for p in phrases)


def negating_phrases() -> tuple[str, ...]:
    """Cues whose words are negation words before an entity: negative "pre"/"both" cues and the "non" prefix.

    "post" cues ("has resolved") deny the entity BEFORE them, so they are not descriptors of what they deny.
    """
    return tuple(
        c.phrase
        for c in default_cues()
        if c.kind == "prefix" or (c.kind == "negative" and c.direction != "post")
    )


def non_negating_phrases() -> tuple[str, ...]:
    """Pseudo and uncertainty cues: a word inside one is no negation word ("no change", "can not be
    excluded")."""
    return tuple(c.phrase for c in default_cues() if c.kind in ("pseudo", "uncertain"))
