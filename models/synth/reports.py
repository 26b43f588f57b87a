"""Write MIMIC-CXR-style free-text reports for a study's findings, with the real negative skew.

Every sentence is generated from a template that carries its polarity (what the radiologist asserts,
doubts, negates, or calls normal) and the finding kinds it speaks about, so labels derived from the text
(CheXpert-style columns, mention counts) follow from what was written, never from a separate guess.
Layout follows MIMIC-CXR (REFERENCE.md §4.1/4.2): indented "FINAL REPORT" title, one leading space per line,
" " blank lines, lines of at most 79 characters, "___" for removed text, and a configurable share of
reports that need the section parser's fallbacks.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.synth.findings import FINDING_CLASSES, Finding

Polarity = Literal["positive", "negative", "uncertain", "normal", "indication"]
LAYOUTS = ("standard", "view_header", "impression_only", "findings_only", "last_paragraph")
TITLE = " " * 33 + "FINAL REPORT"
LINE_WIDTH = 79  # including the leading space

LUNG = frozenset({"opacity", "consolidation", "pneumonia", "nodule", "mass", "atelectasis", "edema"})
ALL = frozenset(FINDING_CLASSES)
AIRSPACE = frozenset({"opacity", "consolidation", "pneumonia"})

CHEXPERT_COLUMNS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
# Table 1 entity -> CheXpert column its mentions label (entities without a column do not label anything).
ENTITY_TO_CHEXPERT = {
    "atelectasis": "Atelectasis",
    "collapse": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "chf": "Edema",
    "cardiomediastinal": "Enlarged Cardiomediastinum",
    "fracture": "Fracture",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "opacity": "Lung Opacity",
    "infiltrate": "Lung Opacity",
    "effusion": "Pleural Effusion",
    "thickening": "Pleural Other",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
    "catheter": "Support Devices",
}


@dataclass(frozen=True)
class Sentence:
    text: str
    polarity: Polarity
    kinds: frozenset[str]  # finding kinds asserted (positive), doubted (uncertain) or ruled out (negative)


@dataclass(frozen=True)
class StudyContext:
    """What the header sections talk about: view, whether a lateral and a prior study exist, patient sex."""

    portable: bool
    has_lateral: bool
    has_prior: bool
    sex: Literal["man", "woman"]


@dataclass(frozen=True)
class ReportStyle:
    p_uncertain: float = 0.15  # a report adds a doubtful mention of an absent finding
    p_impression_repeat: float = 0.7  # a positive finding is restated in the impression
    p_inline_header: float = 0.3  # "FINDINGS:  text" on one line instead of header + blank line
    p_combined_negation: float = 0.6  # "No focal consolidation, pleural effusion or pneumothorax."
    p_impression_negative: float = 0.6  # an extra negative sentence closes the impression


@dataclass(frozen=True)
class Report:
    text: str
    layout: str
    body: list[Sentence]  # the sentences of findings + impression (or their unlabelled stand-ins)
    indication: Sentence


# ----------------------------------------------------------------------------------------------- vocabulary
_SEVERITY = {
    "opacity": {"mild": ["mild", "faint"], "moderate": ["moderate"], "severe": ["dense", "severe"]},
    "consolidation": {"mild": ["mild", "focal"], "moderate": ["moderate"], "severe": ["extensive", "dense"]},
    "pneumonia": {"mild": ["mild", "early"], "moderate": ["moderate"], "severe": ["severe", "extensive"]},
    "atelectasis": {
        "mild": ["mild", "minimal", "subsegmental"],
        "moderate": ["moderate"],
        "severe": ["severe"],
    },
    "edema": {"mild": ["mild"], "moderate": ["moderate"], "severe": ["severe", "marked"]},
    "cardiomegaly": {"mild": ["mild"], "moderate": ["moderate"], "severe": ["severe", "marked"]},
    "effusion": {"small": ["small"], "moderate": ["moderate"], "large": ["large"]},
    "pneumothorax": {"small": ["small", "tiny"], "moderate": ["moderate"], "large": ["large"]},
    "nodule": {"small": ["small", "subcentimeter"], "large": ["large"]},
    "mass": {"small": ["small"], "large": ["large", "bulky"]},
}
_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely", "marked": "markedly"}
_PLURAL = {"opacity": "opacities", "effusion": "effusions"}  # count nouns that go plural when bilateral

# Location phrases per zone: (adjective before the noun, noun phrase after a preposition), side filled in.
_LOCATION = {
    "upper": {
        "one": [
            ("{side} upper lobe", "the {side} upper lobe"),
            ("{side} upper lung", "the {side} upper lung zone"),
        ],
        "both": [("bilateral upper lobe", "both upper lobes"), ("bilateral upper lung", "both upper lungs")],
    },
    "middle": {
        "right": [("right middle lobe", "the right middle lobe"), ("right mid lung", "the right mid lung")],
        "left": [("lingular", "the lingula"), ("left mid lung", "the left mid lung zone")],
        "both": [("bilateral mid lung", "both mid lung zones")],
    },
    "lower": {
        "one": [
            ("{side} lower lobe", "the {side} lower lobe"),
            ("{side} lower lung", "the {side} lung base"),
        ],
        "both": [("bilateral lower lobe", "both lower lobes"), ("bilateral lower lung", "both lung bases")],
    },
    "base": {
        "one": [("{side} basilar", "the {side} base"), ("{side} basal", "the {side} lung base")],
        "both": [("bibasilar", "both lung bases"), ("bilateral basilar", "the lung bases bilaterally")],
    },
    "apex": {"one": [("{side} apical", "the {side} apex"), ("{side} apical", "the {side} lung apex")]},
}

# Positive sentences. Fields: {sev} severity word, {sevly} its adverb, {loc}/{at} location adjective / noun
# phrase, {side}, {noun} (plural when bilateral), {there} "There is"/"There are", {a} article or "", {be}.
# Rule: a positive template names only its own kind's entity and uses no negation/uncertainty cue words.
_FINDINGS_TEMPLATES = {
    "opacity": [
        "{there} {a}{sev} {loc} {noun}.",
        "{sev} patchy {noun} {be} seen in {at}.",
        "{there} {a}{sev} patchy {noun} in {at}.",
        "{sev} airspace {noun} {be} present in {at}.",
    ],
    "consolidation": [
        "There is {sev} consolidation in {at}.",
        "{sev} {loc} consolidation.",
        "{sev} consolidative process in {at}.",
        "{sev} airspace consolidation is present in {at}.",
    ],
    "pneumonia": [
        "Findings are compatible with {sev} {loc} pneumonia.",
        "There is {sev} {loc} pneumonia.",
        "{sev} pneumonia in {at}.",
        "The appearance is consistent with {sev} pneumonia in {at}.",
    ],
    "effusion": [
        "{there} {a}{sev} {side} pleural {noun}.",
        "{sev} {side} pleural {noun} {be} present.",
        "{sev} {side} pleural {noun} with blunting of the costophrenic {angle}.",
        "{there} {a}{sev} layering {side} pleural {noun}.",
    ],
    "pneumothorax": [
        "There is a {sev} {side} apical pneumothorax.",
        "A {sev} {side} pneumothorax is seen at the apex.",
        "{sev} {side} pneumothorax.",
        "A {sev} pneumothorax is present at the {side} apex.",
    ],
    "cardiomegaly": [
        "There is {sev} cardiomegaly.",
        "{sev} cardiomegaly.",
        "The heart is {sevly} enlarged, consistent with cardiomegaly.",
        "The cardiac silhouette is {sevly} enlarged, compatible with cardiomegaly.",
    ],
    "nodule": [
        "There is {a}{sev} nodule in {at}.",
        "{a}{sev} nodular density projects over {at}.",
        "{sev} {loc} nodule.",
        "{a}{sev} pulmonary nodule is seen in {at}.",
    ],
    "mass": [
        "There is {a}{sev} mass in {at}.",
        "{a}{sev} mass is seen in {at}.",
        "{sev} {loc} mass.",
        "{a}{sev} lobulated mass projects over {at}.",
    ],
    "atelectasis": [
        "{sev} {loc} atelectasis.",
        "There is {sev} atelectasis at {at}.",
        "{sev} plate-like atelectasis in {at}.",
        "{sev} {loc} atelectasis is noted.",
    ],
    "edema": [
        "There is {sev} pulmonary edema.",
        "{sev} pulmonary edema with perihilar haziness.",
        "{sev} interstitial edema.",
        "Findings are consistent with {sev} pulmonary edema.",
    ],
}
_IMPRESSION_TEMPLATES = {
    "opacity": ["{sev} {loc} {noun}.", "{loc} {noun}."],
    "consolidation": ["{loc} consolidation.", "{sev} consolidation in {at}."],
    "pneumonia": ["{loc} pneumonia.", "Findings consistent with {loc} pneumonia."],
    "effusion": ["{sev} {side} pleural {noun}.", "{sev} {side} {noun}."],
    "pneumothorax": ["{sev} {side} pneumothorax.", "{sev} {side} apical pneumothorax."],
    "cardiomegaly": ["{sev} cardiomegaly.", "Cardiomegaly."],
    "nodule": ["{sev} {loc} nodule.  Recommend chest CT for further evaluation.", "{loc} nodule."],
    "mass": ["{loc} mass.  Further evaluation with chest CT is recommended.", "{sev} {loc} mass."],
    "atelectasis": ["{sev} {loc} atelectasis.", "{loc} atelectasis."],
    "edema": ["{sev} pulmonary edema.", "Findings consistent with {sev} pulmonary edema."],
}
# Doubtful mentions of a finding that is NOT drawn (CheXpert -1.0); each carries an uncertainty cue.
_UNCERTAIN_TEMPLATES = {
    "pneumonia": [
        "Cannot exclude early pneumonia.",
        "Pneumonia cannot be excluded.",
        "Possible early pneumonia.",
    ],
    "effusion": [
        "Possible small {side} pleural effusion.",
        "A trace {side} pleural effusion cannot be excluded.",
    ],
    "atelectasis": ["Possible minimal {loc} atelectasis.", "Minimal {loc} atelectasis may be present."],
    "consolidation": [
        "Cannot exclude early consolidation in {at}.",
        "Possible subtle consolidation at {at}.",
    ],
    "pneumothorax": [
        "A tiny {side} apical pneumothorax cannot be excluded.",
        "Possible tiny {side} pneumothorax.",
    ],
    "edema": ["Possible mild pulmonary edema.", "Mild interstitial edema cannot be excluded."],
    "nodule": ["A possible small nodule projects over {at}.", "Questionable nodule in {at}."],
    "opacity": ["Questionable faint opacity in {at}.", "Possible subtle opacity at {at}."],
}
_UNCERTAIN_PLACE = {  # where an undrawn doubtful finding is said to be
    "pneumonia": ("lower", ("right", "left")),
    "effusion": ("base", ("right", "left")),
    "atelectasis": ("base", ("right", "left", "bilateral")),
    "consolidation": ("lower", ("right", "left")),
    "pneumothorax": ("apex", ("right", "left")),
    "edema": ("base", ("bilateral",)),
    "nodule": ("upper", ("right", "left")),
    "opacity": ("lower", ("right", "left")),
}

# Statements about what is absent or normal, grouped by topic; each report says each topic at most once.
# A variant is usable only if none of its conflicting kinds is present or doubted in the study. A combined
# topic (several negations in one sentence, as radiologists write them) replaces the topics it covers.
_PLEURA = frozenset({"effusion", "pneumothorax"})
_EDEMA = frozenset({"edema"})


@dataclass(frozen=True)
class Topic:
    name: str
    order: float  # position in the findings paragraph (heart first, bones last)
    p: float  # chance a report mentions the topic
    polarity: Polarity
    variants: list[tuple[str, frozenset[str]]]  # (sentence, kinds it contradicts)
    covers: frozenset[str] = frozenset()  # topics left out once this one is said


_COMBINED = [
    Topic(
        "consolidation+pleura",
        3.0,
        1.0,
        "negative",
        [
            ("There is no focal consolidation, pleural effusion or pneumothorax.", AIRSPACE | _PLEURA),
            ("No focal consolidation, pleural effusion, or pneumothorax is seen.", AIRSPACE | _PLEURA),
            ("No focal consolidation, effusion, or pneumothorax is identified.", AIRSPACE | _PLEURA),
            ("No pneumothorax, pleural effusion, or focal airspace consolidation.", AIRSPACE | _PLEURA),
        ],
        frozenset({"consolidation", "pleura"}),
    ),
    Topic(
        "consolidation+pleura+edema",
        3.0,
        1.0,
        "negative",
        [
            ("No consolidation, effusion, edema or pneumothorax.", AIRSPACE | _PLEURA | _EDEMA),
            (
                "There is no focal consolidation, pleural effusion, pulmonary edema or pneumothorax.",
                AIRSPACE | _PLEURA | _EDEMA,
            ),
        ],
        frozenset({"consolidation", "pleura", "edema"}),
    ),
    Topic(
        "pleura+edema",
        5.5,
        1.0,
        "negative",
        [
            ("No pleural effusion, pneumothorax, or pulmonary edema.", _PLEURA | _EDEMA),
            ("There is no pulmonary edema, pleural effusion or pneumothorax.", _PLEURA | _EDEMA),
        ],
        frozenset({"pleura", "edema"}),
    ),
]
_TOPICS = [
    Topic(
        "heart",
        0.0,
        0.75,
        "normal",
        [
            ("Heart size is normal.", frozenset({"cardiomegaly"})),
            ("The cardiomediastinal silhouette is within normal limits.", frozenset({"cardiomegaly"})),
            ("The cardiac silhouette is normal in size.", frozenset({"cardiomegaly"})),
            ("Normal cardiomediastinal contours.", frozenset({"cardiomegaly"})),
        ],
        frozenset({"cardiomegaly"}),
    ),
    Topic(
        "cardiomegaly",
        0.5,
        0.6,
        "negative",
        [
            ("No cardiomegaly.", frozenset({"cardiomegaly"})),
            ("There is no cardiomegaly.", frozenset({"cardiomegaly"})),
        ],
    ),
    Topic(
        "mediastinum",
        1.0,
        0.5,
        "normal",
        [
            ("The mediastinal and hilar contours are unremarkable.", frozenset()),
            ("Hilar contours are normal.", frozenset()),
            ("The aorta is unremarkable.", frozenset()),
            ("The pulmonary vasculature is normal.", _EDEMA),
        ],
    ),
    Topic(
        "lungs",
        2.5,
        0.4,
        "normal",
        [
            ("The lungs are clear.", LUNG),
            ("The lungs are well expanded and clear.", LUNG),
        ],
    ),
    Topic(
        "consolidation",
        3.0,
        0.9,
        "negative",
        [
            ("There is no focal consolidation.", AIRSPACE),
            ("No focal consolidation is seen.", AIRSPACE),
            ("No consolidation concerning for pneumonia.", AIRSPACE),
            ("There are no focal opacities.", AIRSPACE),
            ("No focal airspace consolidation.", AIRSPACE),
        ],
    ),
    Topic(
        "pneumonia",
        3.2,
        0.6,
        "negative",
        [
            ("No evidence of pneumonia.", AIRSPACE),
            ("There is no evidence of pneumonia.", AIRSPACE),
            ("No radiographic evidence of pneumonia.", AIRSPACE),
        ],
    ),
    Topic(
        "edema",
        3.5,
        0.75,
        "negative",
        [
            ("No pulmonary edema.", _EDEMA),
            ("There is no pulmonary edema.", _EDEMA),
            ("No pulmonary edema or vascular congestion.", _EDEMA),
            ("There is no evidence of congestion or edema.", _EDEMA),
            ("No signs of CHF.", frozenset({"edema", "cardiomegaly"})),
        ],
    ),
    Topic(
        "lesions",
        3.7,
        0.6,
        "negative",
        [
            ("No pulmonary nodules or masses are identified.", frozenset({"nodule", "mass"})),
            ("There is no suspicious pulmonary nodule.", frozenset({"nodule"})),
            ("No mass is seen.", frozenset({"mass"})),
        ],
    ),
    Topic(
        "atelectasis",
        3.8,
        0.4,
        "negative",
        [
            ("There is no atelectasis.", frozenset({"atelectasis"})),
            ("No atelectasis or collapse.", frozenset({"atelectasis"})),
        ],
    ),
    Topic(
        "pleura",
        5.5,
        0.95,
        "negative",
        [
            ("No pleural effusion or pneumothorax.", _PLEURA),
            ("There is no pleural effusion or pneumothorax.", _PLEURA),
            ("No pleural effusions or pneumothorax is seen.", _PLEURA),
            ("There is no pleural effusion.", frozenset({"effusion"})),
            ("No effusion is seen.", frozenset({"effusion"})),
            ("No pneumothorax.", frozenset({"pneumothorax"})),
            ("There is no evidence of pneumothorax.", frozenset({"pneumothorax"})),
        ],
    ),
    Topic(
        "bones",
        7.0,
        0.6,
        "negative",
        [
            ("No displaced rib fracture is seen.", frozenset()),
            ("No acute fracture.", frozenset()),
            ("There are no fractures.", frozenset()),
        ],
    ),
    Topic(
        "other",
        8.0,
        0.6,
        "negative",
        [
            ("The lungs are not hyperinflated.", frozenset()),
            ("No hilar lymphadenopathy.", frozenset()),
            ("There is no pleural calcification.", frozenset()),
            ("No free air below the right hemidiaphragm.", frozenset()),
            ("There is no pleural thickening.", frozenset({"effusion"})),
            ("No calcified granulomas.", frozenset()),
        ],
    ),
    Topic(
        "extra",
        8.5,
        0.5,
        "negative",
        [
            ("There is no hiatal hernia.", frozenset()),
            ("No mediastinal widening or hilar enlargement.", frozenset()),
            ("No acute osseous abnormality.", frozenset()),
            ("No evidence of fibrosis or emphysema.", frozenset()),
        ],
    ),
]
_NORMAL_IMPRESSIONS: list[tuple[str, Polarity, frozenset[str]]] = [
    ("No acute cardiopulmonary process.", "normal", ALL),
    ("No acute cardiopulmonary abnormality.", "negative", ALL),
    ("No evidence of pneumonia.", "negative", AIRSPACE),
    ("Normal chest radiograph.", "normal", ALL),
    ("No acute intrathoracic process.", "normal", ALL),
]
_IMPRESSION_NEGATIVES: list[tuple[str, frozenset[str]]] = [
    ("No pneumothorax.", frozenset({"pneumothorax"})),
    ("No pleural effusion.", frozenset({"effusion"})),
    ("No pulmonary edema.", frozenset({"edema"})),
    ("No focal consolidation.", AIRSPACE),
]
_COMPLAINTS = [
    "cough and fever",
    "shortness of breath",
    "chest pain",
    "hypoxia",
    "productive cough",
    "a fall",
    "tachypnea",
    "leukocytosis",
    "weakness",
    "dyspnea on exertion",
    "fever of unknown origin",
]
_QUESTIONS = [
    "pneumonia",
    "acute process",
    "interval change",
    "infiltrate",
    "effusion",
    "pneumothorax",
    "acute cardiopulmonary process",
    "fluid overload",
]
_INDICATIONS = [
    "___ year old {sex} with {complaint}, evaluate for {question}.",
    "___ year old {sex} with {complaint}.  Evaluate for {question}.",
    "___ year old {sex} with {complaint} // ? {question}",
    "___{letter} with {complaint}, r/o {question}",
]


# ------------------------------------------------------------------------------------------ sentence writing
def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _article(word: str) -> str:
    return "an " if word[:1].lower() in "aeiou" else "a "


def _location(rng: np.random.Generator, zone: str | None, side: str | None) -> tuple[str, str]:
    if zone is None or side is None or zone == "perihilar":
        return "perihilar", "the perihilar regions"
    table = _LOCATION[zone]
    key = "both" if side == "bilateral" else (side if side in table else "one")
    adj, noun_phrase = _pick(rng, table[key])
    return adj.format(side=side), noun_phrase.format(side=side)


def _fill(
    template: str, rng: np.random.Generator, kind: str, side: str | None, zone: str | None, sev: str
) -> str:
    """Fill one template; `sev` is the severity category, turned into one of its words here."""
    word = _pick(rng, _SEVERITY[kind][sev]) if sev else ""
    plural = side == "bilateral" and kind in _PLURAL
    loc, at = _location(rng, zone, side)
    text = template.format(
        sev=word,
        sevly=_ADVERB.get(word, word + "ly"),
        loc=loc,
        at=at,
        side=side or "",
        noun=_PLURAL[kind] if plural else kind,
        there="There are" if plural else "There is",
        a="" if plural else _article(word),
        be="are" if plural else "is",
        angle="angles" if side == "bilateral" else "angle",
    )
    text = re.sub(r"\s+", " ", text).replace(" .", ".").strip()
    return text[0].upper() + text[1:]


def positive_sentence(f: Finding, rng: np.random.Generator, impression: bool = False) -> Sentence:
    templates = (_IMPRESSION_TEMPLATES if impression else _FINDINGS_TEMPLATES)[f.kind]
    text = _fill(_pick(rng, templates), rng, f.kind, f.side, f.zone, f.severity)
    return Sentence(text.replace(". ", ".  "), "positive", frozenset({f.kind}))


def uncertain_sentence(kind: str, rng: np.random.Generator) -> Sentence:
    zone, sides = _UNCERTAIN_PLACE[kind]
    text = _fill(_pick(rng, _UNCERTAIN_TEMPLATES[kind]), rng, kind, _pick(rng, list(sides)), zone, "")
    return Sentence(text, "uncertain", frozenset({kind}))


def _choose_uncertain(findings: list[Finding], rng: np.random.Generator, p_uncertain: float) -> list[str]:
    """Doubtful kinds: absent ones only; an airspace opacity often comes with "pneumonia cannot be
    excluded"."""
    present = {f.kind for f in findings}
    doubted: list[str] = []
    if "opacity" in present and "pneumonia" not in present and rng.random() < 0.5:
        doubted.append("pneumonia")
    if rng.random() < p_uncertain:
        candidates = [k for k in _UNCERTAIN_TEMPLATES if k not in present and k not in doubted]
        doubted.append(_pick(rng, candidates))
    return doubted


def _say(topic: Topic, rng: np.random.Generator, blocked: set[str]) -> tuple[float, Sentence] | None:
    usable = [(text, kinds) for text, kinds in topic.variants if not kinds & blocked]
    if not usable:
        return None
    text, kinds = _pick(rng, usable)
    return topic.order, Sentence(text, topic.polarity, kinds)


def _statements(
    rng: np.random.Generator, blocked: set[str], p_combined: float
) -> list[tuple[float, Sentence]]:
    """The normal/negative statements of the findings section, each topic at most once, never
    contradicting."""
    out: list[tuple[float, Sentence]] = []
    covered: frozenset[str] = frozenset()
    if rng.random() < p_combined:
        combined = _pick(rng, _COMBINED)
        said = _say(combined, rng, blocked)
        if said is not None:
            out.append(said)
            covered = combined.covers
    for topic in _TOPICS:
        if topic.name not in covered and rng.random() < topic.p:
            said = _say(topic, rng, blocked)
            if said is not None:
                out.append(said)
                covered |= topic.covers
    return out


def _positive_order(kind: str) -> float:
    return {"cardiomegaly": 0.2, "effusion": 5.0, "pneumothorax": 5.2}.get(kind, 2.0)


def write_body(
    findings: list[Finding], rng: np.random.Generator, style: ReportStyle
) -> tuple[list[Sentence], list[Sentence]]:
    """(findings sentences, impression sentences) for one study, in reading order."""
    present = {f.kind for f in findings}
    doubted = _choose_uncertain(findings, rng, style.p_uncertain)
    blocked = present | set(doubted)
    ordered = _statements(rng, blocked, style.p_combined_negation)
    ordered += [(_positive_order(f.kind), positive_sentence(f, rng)) for f in findings]
    doubt_in_findings = [k for k in doubted if rng.random() < 0.5]
    ordered += [(4.0, uncertain_sentence(k, rng)) for k in doubt_in_findings]
    body = [s for _, s in sorted(ordered, key=lambda item: item[0])]

    negated = {k for s in body if s.polarity == "negative" for k in s.kinds}  # no need to say these twice
    impression: list[Sentence] = []
    if findings:
        repeat = [f for f in findings if rng.random() < style.p_impression_repeat] or [findings[0]]
        impression += [positive_sentence(f, rng, impression=True) for f in repeat]
    else:
        # "No acute process" (conflicting with ALL) may stand beside a doubt; specific negatives may not.
        usable = [
            (text, polarity, kinds)
            for text, polarity, kinds in _NORMAL_IMPRESSIONS
            if not kinds & (present if kinds == ALL else blocked | negated)
        ]
        text, polarity, kinds = _pick(rng, usable)
        impression.append(Sentence(text, polarity, kinds))
    if rng.random() < style.p_impression_negative:
        extra = [(text, kinds) for text, kinds in _IMPRESSION_NEGATIVES if not kinds & (blocked | negated)]
        if extra:
            text, kinds = _pick(rng, extra)
            impression.append(Sentence(text, "negative", kinds))
    impression += [uncertain_sentence(k, rng) for k in doubted if k not in doubt_in_findings]
    return body, impression


# -------------------------------------------------------------------------------------------- report layout
def _paragraph(sentences: list[Sentence]) -> str:
    return "  ".join(s.text for s in sentences)


def wrap(text: str) -> list[str]:
    """MIMIC lines: one leading space, at most 79 characters in all."""
    lines = textwrap.wrap(text, width=LINE_WIDTH - 1, break_long_words=False, break_on_hyphens=False)
    return [" " + line for line in lines]


def _section(name: str, text: str, block: bool) -> list[str]:
    """`NAME:  text` on one line, or (block) `NAME: ` then a " " line then the text."""
    if block:
        return [f" {name}: ", " ", *wrap(text)]
    return wrap(f"{name}:  {text}")


def _indication(rng: np.random.Generator, ctx: StudyContext) -> Sentence:
    text = _pick(rng, _INDICATIONS).format(
        sex=ctx.sex,
        letter="M" if ctx.sex == "man" else "F",
        complaint=_pick(rng, _COMPLAINTS),
        question=_pick(rng, _QUESTIONS),
    )
    return Sentence(text, "indication", frozenset())


def _exam_and_technique(rng: np.random.Generator, ctx: StudyContext) -> tuple[str, str, str]:
    """(EXAMINATION text, TECHNIQUE text, view-title header used when FINDINGS is replaced by a view
    title)."""
    if ctx.portable:
        return (
            "CHEST (PORTABLE AP)",
            _pick(rng, ["Portable AP chest radiograph.", "Single frontal view."]),
            ("CHEST, AP PORTABLE"),
        )
    if ctx.has_lateral:
        return (
            "CHEST (PA AND LAT)",
            _pick(rng, ["Chest PA and lateral", "PA and lateral views of the chest."]),
            (_pick(rng, ["PA AND LATERAL VIEWS OF THE CHEST", "CHEST, PA AND LATERAL"])),
        )
    return "CHEST (PA)", "PA view of the chest.", "CHEST, PA"


def write_report(
    findings: list[Finding], ctx: StudyContext, layout: str, rng: np.random.Generator, style: ReportStyle
) -> Report:
    """The full report text of one study in the requested layout (one of LAYOUTS)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown report layout {layout!r}; expected one of {LAYOUTS}")
    findings_part, impression_part = write_body(findings, rng, style)
    indication = _indication(rng, ctx)
    exam, technique, view_title = _exam_and_technique(rng, ctx)
    comparison = _pick(
        rng,
        ["___.", "Chest radiograph from ___.", "Prior study from ___."]
        if ctx.has_prior
        else ["None.", "No prior studies available."],
    )
    block = rng.random() >= style.p_inline_header

    lines = [
        TITLE,
        *_section("EXAMINATION", exam, False),
        " ",
        *_section("INDICATION", indication.text, False),
    ]
    if layout != "last_paragraph":
        lines += [" ", *_section("TECHNIQUE", technique, False)]
    lines += [" ", *_section("COMPARISON", comparison, False)]
    body = findings_part + impression_part
    if layout == "standard":
        lines += [" ", *_section("FINDINGS", _paragraph(findings_part), block)]
        lines += [" ", *_section("IMPRESSION", _paragraph(impression_part), block)]
    elif layout == "view_header":
        lines += [" ", *_section(view_title, _paragraph(findings_part), block)]
        lines += [" ", *_section("IMPRESSION", _paragraph(impression_part), block)]
    elif layout == "impression_only":
        lines += [" ", *_section("IMPRESSION", _paragraph(body), block)]
    elif layout == "findings_only":
        body = findings_part
        lines += [" ", *_section("FINDINGS", _paragraph(body), block)]
    else:  # last_paragraph: unlabelled paragraphs after COMPARISON, as in reports without headers
        lines += [" ", *wrap(_paragraph(findings_part)), " ", *wrap(_paragraph(impression_part))]
    if layout == "standard" and {f.kind for f in findings} & {"pneumothorax", "mass"} and rng.random() < 0.5:
        note = "The findings were discussed with Dr. ___ by Dr. ___ on the telephone at ___ on ___."
        lines += [" ", *_section("NOTIFICATION", note, False)]
    return Report("\n".join(lines) + "\n", layout, body, indication)


# ------------------------------------------------------------------------------------------ labels and counts
def _stem(entity: str) -> str:
    """Crude inflection stem so 'opacities', 'effusions', 'consolidative', 'nodular' count as mentions."""
    for suffix, keep in (("ion", ""), ("ity", "it"), ("ed", ""), ("y", ""), ("e", "")):
        if entity.endswith(suffix) and len(entity) > len(suffix) + 3:
            return entity[: -len(suffix)] + keep
    return entity


def entity_matcher(entities: list[str]) -> tuple[re.Pattern[str], list[str]]:
    """One case-insensitive regex over all entities; group i+1 matches entities[i] with its inflections."""
    order = sorted(range(len(entities)), key=lambda i: -len(_stem(entities[i])))
    ordered = [entities[i] for i in order]
    body = "|".join(f"({re.escape(_stem(e))}\\w*)" for e in ordered)
    return re.compile(rf"\b(?:{body})", re.IGNORECASE), ordered


def mentions(
    sentences: list[Sentence], matcher: tuple[re.Pattern[str], list[str]]
) -> list[tuple[str, Polarity]]:
    """(entity, polarity) for every entity word in `sentences`, in order."""
    pattern, names = matcher
    out: list[tuple[str, Polarity]] = []
    for sentence in sentences:
        for match in pattern.finditer(sentence.text):
            out.append((names[match.lastindex - 1], sentence.polarity))  # type: ignore[operator]
    return out


def polarity_counts(found: list[tuple[str, Polarity]]) -> Counter[str]:
    return Counter(polarity for _, polarity in found)


def chexpert_labels(found: list[tuple[str, Polarity]]) -> dict[str, str]:
    """CheXpert-style study labels from the mentions: '1.0' > '-1.0' > '0.0' per column, '' when
    unmentioned."""
    rank = {"1.0": 3, "-1.0": 2, "0.0": 1, "": 0}
    value_of = {"positive": "1.0", "uncertain": "-1.0", "negative": "0.0", "normal": "0.0"}
    labels = dict.fromkeys(CHEXPERT_COLUMNS, "")
    for entity, polarity in found:
        column = ENTITY_TO_CHEXPERT.get(entity)
        if column is None or polarity not in value_of:
            continue
        value = value_of[polarity]
        if rank[value] > rank[labels[column]]:
            labels[column] = value
    pathology = [c for c in CHEXPERT_COLUMNS if c not in ("No Finding", "Support Devices")]
    labels["No Finding"] = "" if any(labels[c] in ("1.0", "-1.0") for c in pathology) else "1.0"
    return labels
