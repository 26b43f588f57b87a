"""Entity mentions in radiology reports: which of the paper's entities a report names, where, with which
descriptor words before them, and whether the report affirms, denies or hedges each one.

ECAMP (§3.1-3.2) needs, per report, the Table 1 entities it mentions (for the teacher prompt), the β words
before each entity (the "descriptors" that are masked and re-weighted in MLM) and their polarity (Fig. 2 (b):
negative descriptors outnumber positive ones about 20:1). This module computes all three at MIMIC scale:

* one search over a whole batch of reports (joined into one string) finds every entity surface form AND
  every cue phrase (negation, uncertainty, pseudo-negation, scope terminator), leftmost-longest. It is one
  compiled regex whose alternation is a character trie, with a possessive word skipper so the words in
  between are walked inside the regex engine (a per-word numpy search for ASCII text was 1.2x faster at
  MIMIC size, 5.7 against 7.0 CPU-s, and was dropped as a second engine for one behaviour: bench/RESULTS.md);
* sentence ends, ';', words and clause terminators become sorted position arrays, so sentence index,
  clause, nearest trigger and the β descriptor words of every mention are found with `numpy.searchsorted`
  for all mentions together; strings are gathered by Arrow, not sliced one by one in Python.

Polarity follows NegEx/ConText with clause scope: a trigger before an entity applies up to the end of its
clause (sentence end, ';', "but", "however", "although", "there is", ...), the NEAREST preceding trigger wins
(so "no pneumonia, possible atelectasis" hedges atelectasis), a pseudo-trigger ("no change in", "not only")
is a trigger with no effect, and a trigger after the entity ("has resolved", "cannot be excluded") reaches
back a few words within its clause. Negation wins over uncertainty when both apply. The cue phrases come
from `models.text.negation`, which the MLM's negative descriptors (`models.text.masking`) read too. Masking
scopes a cue to its own words instead of its clause because Eq. 3 weighs the negation words themselves, not
every word describing a denied entity (details in `models.text.negation`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from data_contracts.entities import DescriptorStat, EntityMention, EntityStat
from models.text.negation import Cue, default_cues

Polarity = Literal["positive", "negative", "uncertain"]
POLARITIES: tuple[Polarity, ...] = ("positive", "negative", "uncertain")

# ------------------------------------------------------------------------------------------------------------
# Data: surface forms of the Table 1 entities (canonical form first). Inflections and close derivations of
# the same word only (plural, participle, nominalisation, adjective); no synonyms of other roots, except the
# spelled-out forms of the two abbreviations (CHF, COPD). "aortic" is left out on purpose: it mostly names
# other anatomy ("aortic knob", "aortic arch"), not the aorta as a finding.
# ------------------------------------------------------------------------------------------------------------
TABLE1_SURFACE_FORMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "abnormality": ("abnormality", "abnormalities"),
        "abscess": ("abscess", "abscesses"),
        "aerate": ("aerate", "aerates", "aerated", "aerating", "aeration"),
        "aorta": ("aorta", "aortas"),
        "atelectasis": ("atelectasis", "atelectases", "atelectatic"),
        "bronchiectasis": ("bronchiectasis", "bronchiectases", "bronchiectatic"),
        "calcification": ("calcification", "calcifications", "calcified", "calcific"),
        "cardiomediastinal": ("cardiomediastinal",),
        "cardiomegaly": ("cardiomegaly",),
        "catheter": ("catheter", "catheters"),
        "chf": ("chf", "congestive heart failure"),
        "collapse": ("collapse", "collapses", "collapsed"),
        "congestion": ("congestion", "congested"),
        "consolidation": ("consolidation", "consolidations", "consolidative", "consolidated"),
        "contour": ("contour", "contours"),
        "copd": ("copd", "chronic obstructive pulmonary disease"),
        "deformity": ("deformity", "deformities", "deformed"),
        "dilation": ("dilation", "dilations", "dilatation", "dilatations", "dilated"),
        "distention": ("distention", "distension", "distended"),
        "edema": ("edema", "oedema", "edematous"),
        "effusion": ("effusion", "effusions"),
        "embolism": ("embolism", "embolisms", "embolus", "emboli"),
        "emphysema": ("emphysema", "emphysematous"),
        "engorgement": ("engorgement", "engorged"),
        "fibrosis": ("fibrosis", "fibrotic"),
        "fracture": ("fracture", "fractures", "fractured"),
        "granuloma": ("granuloma", "granulomas", "granulomata", "granulomatous"),
        "hernia": ("hernia", "hernias", "herniation", "herniated"),
        "hilar": ("hilar", "hilum", "hila"),
        "hyperinflated": ("hyperinflated", "hyperinflation"),
        "hemidiaphragm": ("hemidiaphragm", "hemidiaphragms", "hemidiaphragmatic"),
        "infiltrate": ("infiltrate", "infiltrates", "infiltration", "infiltrations", "infiltrative"),
        "mass": ("mass", "masses"),
        "nodule": ("nodule", "nodules", "nodular"),
        "obscure": ("obscure", "obscures", "obscured", "obscuring", "obscuration"),
        "opacity": ("opacity", "opacities", "opacification", "opacifications", "opacified"),
        "perihilar": ("perihilar",),
        "pneumonia": ("pneumonia", "pneumonias"),
        "pneumothorax": ("pneumothorax", "pneumothoraces", "pneumothoraxes"),
        "sarcoidosis": ("sarcoidosis", "sarcoid"),
        "silhouette": ("silhouette", "silhouettes"),
        "thickening": ("thickening", "thickenings", "thickened"),
        "tuberculosis": ("tuberculosis", "tuberculous"),
        "vasculature": ("vasculature", "vascularity"),
    }
)

# Auxiliaries allowed between an entity and a post cue ("the effusion HAS NOW resolved") without ending its
# reach.
_AUXILIARIES = frozenset(
    "is are was were has have had been be being now since essentially completely entirely largely".split()
)
_COPULAS = frozenset("is are was were".split())


# ------------------------------------------------------------------------------------------------------------
# Entity lists
# ------------------------------------------------------------------------------------------------------------
class EntityListError(ValueError):
    """An entity list file is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class EntityLexicon:
    """Canonical entities (lower case, list order) and the surface form -> canonical entity map."""

    entities: tuple[str, ...]
    forms: Mapping[str, str]
    source: str = "<memory>"


def regular_plural(word: str) -> str:
    """English regular plural, used for entities of user lists that the built-in table does not cover."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _normalise_phrase(text: str) -> str:
    return " ".join(text.lower().split())


def build_lexicon(
    entities: Sequence[str], extra_forms: Mapping[str, Sequence[str]] | None = None, source: str = "<memory>"
) -> EntityLexicon:
    """Lexicon for `entities`: Table 1 inflections where known, else the word and its regular plural."""
    extra_forms = extra_forms or {}
    canon = [_normalise_phrase(e) for e in entities]
    if len(set(canon)) != len(canon):
        dup = next(e for e in canon if canon.count(e) > 1)
        raise EntityListError(f"{source}: entity '{dup}' is listed twice")
    forms: dict[str, str] = {}
    for entity in canon:
        surface = TABLE1_SURFACE_FORMS.get(entity) or (entity, regular_plural(entity))
        for form in (*surface, *(_normalise_phrase(f) for f in extra_forms.get(entity, ()))):
            owner = forms.setdefault(form, entity)
            if owner != entity:
                raise EntityListError(
                    f"{source}: surface form '{form}' belongs to both '{owner}' and '{entity}'"
                )
    return EntityLexicon(tuple(canon), MappingProxyType(forms), source)


_LIST_LINE = re.compile(r"^([a-z0-9][a-z0-9 '\-]*?)\s*(?::\s*(.*))?$")


def load_entity_list(path: str | Path) -> EntityLexicon:
    """Read an entity list: one entity per line, optionally `entity: form, form` to add surface forms.

    Blank lines and `#` comments are ignored; matching is case-insensitive, so the file's case is not kept.
    """
    path = Path(path)
    if not path.is_file():
        raise EntityListError(f"{path}: entity list not found")
    entities: list[str] = []
    extra: dict[str, list[str]] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip().lower()
        if not line:
            continue
        match = _LIST_LINE.match(line)
        if match is None:
            raise EntityListError(f"{path}:{number}: cannot read entity line {raw!r}")
        entity = _normalise_phrase(match.group(1))
        entities.append(entity)
        if match.group(2):
            extra[entity] = [f for f in (s.strip() for s in match.group(2).split(",")) if f]
    if not entities:
        raise EntityListError(f"{path}: no entities in the list")
    return build_lexicon(entities, extra, source=str(path))


# ------------------------------------------------------------------------------------------------------------
# The scanner regex
# ------------------------------------------------------------------------------------------------------------
def trie_pattern(phrases: Iterable[str]) -> str:
    """Regex alternation of `phrases` as a character trie: one branch per first letter, not per phrase.

    Python's `re` tries alternatives one by one, so a flat alternation of ~300 phrases would cost ~300 tests
    at every word; the trie costs one test per character of the longest common prefix. Optional tails are
    greedy, so the longest phrase wins ("no evidence of" over "no"); a space matches any whitespace run.
    """
    root: dict[str, dict] = {}
    for phrase in phrases:
        node = root
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict[str, dict]) -> str:
        branches = [
            (r"\s+" if c == " " else re.escape(c)) + emit(child) for c, child in sorted(node.items()) if c
        ]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(root)


class MatcherConfig(BaseModel):
    """The matcher's settings; `match_entities` nests it as its `matcher` section. Cues are code, not config.
    β, the descriptor words before each entity, is the matcher's argument: in the pipeline it is
    pre-training's `pretrain_ecamp.text.beta`, so the descriptors counted here are the ones the MLM masks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    post_window: int = Field(
        6, ge=0, description="most words between an entity and a cue after it (resolved, ...)"
    )
    batch_size: int = Field(
        20_000, ge=1, description="reports scanned as one string (bounds memory, not speed)"
    )


_KIND_NONE, _KIND_NEG, _KIND_UNC = 0, 1, 2
_POLARITY_CODE = {"pseudo": _KIND_NONE, "negative": _KIND_NEG, "uncertain": _KIND_UNC}
_PUNCTUATION = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum())
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_OTHER, _SPACE, _ALNUM, _SENTENCE_STOP = 0, 1, 2, 3


def _character_classes() -> np.ndarray:
    """Class of every code point up to U+3000 (the last whitespace); the extra last entry stands for all
    higher code points (counted as letters). Whitespace is what `str.split()` splits on."""
    classes = np.full(0x3002, _ALNUM, dtype=np.uint8)
    for code in range(0x3001):
        char = chr(code)
        if char.isspace():
            classes[code] = _SPACE
        elif not char.isalnum():
            classes[code] = _SENTENCE_STOP if char in ".!?" else _OTHER
    return classes


_CHAR_CLASS = _character_classes()
_WORD = re.compile(r"\w+(?:['\-]\w+)*")
_BATCH_SEPARATOR = "\n\n"  # a sentence end: nothing crosses report borders


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    values = np.sort(values)
    return values[np.concatenate(([True], values[1:] != values[:-1]))] if len(values) else values


def _lower_keep_length(text: str) -> str:
    """Lower-case without moving character offsets (a few Unicode letters lower-case to two characters)."""
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


@dataclass
class _Characters:
    """Character classes of a batch string, computed once with numpy (one array entry per character).

    Words are whitespace tokens holding at least one letter or digit; sentences end after `.`, `!` or `?`
    followed by whitespace, and at blank lines.
    """

    ascii_bytes: bytes | None  # the text as bytes when it is ASCII (then byte offsets = character offsets)
    word_starts: np.ndarray
    word_ends: np.ndarray
    sentence_ends: np.ndarray
    semicolons: np.ndarray

    @classmethod
    def of(cls, text: str, has_newline: bool = True) -> _Characters:
        """`has_newline=False` skips the blank-line search (batch separators are report starts anyway)."""
        ascii_bytes = text.encode("ascii") if text.isascii() else None
        if ascii_bytes is not None:
            codes = np.frombuffer(ascii_bytes, dtype=np.uint8)
        else:
            codes = np.minimum(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), len(_CHAR_CLASS) - 1)
        kind = _CHAR_CLASS[codes]
        space = kind == _SPACE
        before_space = np.concatenate(([True], space[:-1]))
        after_space = np.concatenate((space[1:], [True]))
        token_starts = np.flatnonzero(~space & before_space)
        token_ends = np.flatnonzero(~space & after_space) + 1
        alnum = kind == _ALNUM
        # a token is a word if it holds a letter or digit: nearly always its first or last character
        is_word = alnum[token_starts] | alnum[token_ends - 1]
        for i in np.flatnonzero(~is_word).tolist():  # "(1)", "-", "...": look inside
            is_word[i] = any(ch.isalnum() for ch in text[token_starts[i] : token_ends[i]])
        sentence_ends = np.flatnonzero((kind == _SENTENCE_STOP) & after_space) + 1
        blank_lines = _BLANK_LINE.finditer(text) if has_newline else ()
        blank_line_ends = np.fromiter((m.end() for m in blank_lines), dtype=np.int64)
        return cls(
            ascii_bytes=ascii_bytes,
            word_starts=token_starts[is_word],
            word_ends=token_ends[is_word],
            sentence_ends=np.concatenate((sentence_ends, blank_line_ends)),
            semicolons=np.flatnonzero(codes == ord(";")),
        )

    def strings(self, text: str, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
        """`text[s:e]` for sorted, non-overlapping spans, as Arrow strings; no Python loop for ASCII text.

        The spans and the gaps between them become one Arrow array over the text's bytes (offsets
        0, s0, e0, s1, e1, ..., len); taking every other element keeps the spans.
        """
        if self.ascii_bytes is None:
            return pa.array(
                [text[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)], pa.string()
            )
        offsets = np.empty(2 * len(starts) + 2, dtype=np.int64)
        offsets[0], offsets[-1] = 0, len(self.ascii_bytes)
        offsets[1:-1:2], offsets[2:-1:2] = starts, ends
        pieces = pa.LargeStringArray.from_buffers(
            len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(self.ascii_bytes)
        )
        return pieces.take(pa.array(np.arange(1, len(offsets) - 1, 2))).cast(pa.string())


@dataclass
class _Batch:
    """Positions found in one batch string, all as numpy arrays of character offsets into that string."""

    text: str
    chars: _Characters
    report_starts: np.ndarray
    sentence_starts: np.ndarray
    clause_starts: np.ndarray
    m_start: np.ndarray
    m_end: np.ndarray
    m_entity: np.ndarray
    pre_end: np.ndarray
    pre_kind: np.ndarray
    post_start: np.ndarray
    post_kind: np.ndarray
    prefix_end: np.ndarray


class EntityMatcher:
    """Finds entity mentions with descriptors and polarity in many reports at once.

    Usage: `EntityMatcher(load_entity_list(path)).match(study_ids, texts)` -> Arrow table with the columns of
    the `entity_mentions` contract. Everything compiled once here; `match` only scans.
    """

    def __init__(
        self,
        lexicon: EntityLexicon,
        config: MatcherConfig | None = None,
        cues: Sequence[Cue] | None = None,
        beta: int = 2,
    ):
        if beta < 0:
            raise ValueError(f"beta (descriptor words before an entity) must be >= 0, got {beta}")
        self.lexicon = lexicon
        self.config = config or MatcherConfig()
        self.beta = beta
        # target id: 0..E-1 entities (by canonical index), E.. cues
        entity_index = {e: i for i, e in enumerate(lexicon.entities)}
        targets: dict[str, int] = {form: entity_index[e] for form, e in lexicon.forms.items()}
        self._cues: list[Cue] = []
        for cue in default_cues() if cues is None else cues:
            phrase = _normalise_phrase(cue.phrase)
            if phrase in targets:
                owner = targets[phrase]
                what = (
                    lexicon.entities[owner]
                    if owner < len(lexicon.entities)
                    else self._cues[owner - len(lexicon.entities)]
                )
                raise ValueError(f"cue '{phrase}' is also {what!r}: each phrase must have one meaning")
            targets[phrase] = len(lexicon.entities) + len(self._cues)
            self._cues.append(cue)
        self._targets = targets
        self._n_entities = len(lexicon.entities)
        # Per target id lookup tables, so that a whole batch is classified with numpy indexing.
        kinds = ["entity"] * self._n_entities + [c.kind for c in self._cues]
        directions = ["none"] * self._n_entities + [c.direction for c in self._cues]
        self._effect = np.array([_POLARITY_CODE.get(k, -1) for k in kinds], dtype=np.int64)
        self._is_pre = np.array([d in ("pre", "both") for d in directions]) & (self._effect >= 0)
        self._is_post = np.array([d in ("post", "both") for d in directions]) & (self._effect >= 0)
        self._is_terminator = np.array([k == "terminator" for k in kinds])
        self._is_prefix = np.array([k == "prefix" for k in kinds])
        # Possessive skipper: whole non-target words are consumed inside the regex engine. Both groups are
        # captured so that `re.split` returns pieces whose lengths add up to the text (offsets by cumsum).
        self._scanner = re.compile(r"((?:\w++\W++)*?)\b(" + trie_pattern(targets) + r")\b")

    # -- scanning ------------------------------------------------------------------------------------------
    def _target_ids(self, matched: list[str]) -> np.ndarray:
        ids = list(map(self._targets.get, matched))
        if None in ids:  # phrases written with a newline or a double space
            ids = [
                self._targets[" ".join(m.split())] if i is None else i
                for m, i in zip(matched, ids, strict=True)
            ]
        return np.asarray(ids, dtype=np.int64)

    def _find_with_regex(self, low: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(starts, ends, target ids) of the leftmost-longest targets in `low`, by the trie regex."""
        pieces = self._scanner.split(low)  # [gap, skipped, target, gap, ..., tail]
        piece_lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        piece_starts = np.cumsum(piece_lengths) - piece_lengths
        matched = pieces[2::3]
        starts = piece_starts[2::3]
        ends = starts + np.fromiter(map(len, matched), dtype=np.int64, count=len(matched))
        return starts, ends, self._target_ids(matched)

    def _scan(self, texts: Sequence[str]) -> _Batch:
        text = _BATCH_SEPARATOR.join(texts)
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        report_starts = np.concatenate(([0], np.cumsum(lengths + len(_BATCH_SEPARATOR))[:-1]))

        low = _lower_keep_length(text)
        chars = _Characters.of(text, any("\n" in t for t in texts))
        starts, ends, ids = self._find_with_regex(low)

        is_entity = ids < self._n_entities
        is_pre, is_post = self._is_pre[ids], self._is_post[ids]
        sentence_starts = _sorted_unique(np.concatenate((report_starts, chars.sentence_ends)))
        clause_starts = _sorted_unique(
            np.concatenate((sentence_starts, chars.semicolons, starts[self._is_terminator[ids]]))
        )
        return _Batch(
            text=text,
            chars=chars,
            report_starts=report_starts,
            sentence_starts=sentence_starts,
            clause_starts=clause_starts,
            m_start=starts[is_entity],
            m_end=ends[is_entity],
            m_entity=ids[is_entity],
            pre_end=ends[is_pre],
            pre_kind=self._effect[ids[is_pre]],
            post_start=starts[is_post],
            post_kind=self._effect[ids[is_post]],
            prefix_end=ends[self._is_prefix[ids]],
        )

    # -- polarity ------------------------------------------------------------------------------------------
    def _pre_effect(self, b: _Batch, clause: np.ndarray) -> np.ndarray:
        """Effect of the nearest pre cue in the mention's clause (0 none, 1 negative, 2 uncertain)."""
        if not len(b.pre_end):
            return np.zeros(len(b.m_start), dtype=np.int64)
        idx = np.searchsorted(b.pre_end, b.m_start, side="right") - 1
        safe = np.maximum(idx, 0)
        cue_clause = np.searchsorted(b.clause_starts, b.pre_end[safe] - 1, side="right")
        return np.where((idx >= 0) & (cue_clause == clause), b.pre_kind[safe], _KIND_NONE)

    def _post_effect(self, b: _Batch, clause: np.ndarray) -> np.ndarray:
        """Effect of the nearest post cue after the mention in its clause, within `post_window` words."""
        effect = np.zeros(len(b.m_start), dtype=np.int64)
        if not len(b.post_start):
            return effect
        idx = np.searchsorted(b.post_start, b.m_end, side="left")
        has = idx < len(b.post_start)
        safe = np.minimum(idx, len(b.post_start) - 1)
        cue_clause = np.searchsorted(b.clause_starts, b.post_start[safe], side="right")
        candidates = np.flatnonzero(has & (cue_clause == clause))
        for i in candidates.tolist():
            cue = int(safe[i])
            if self._post_reaches(b.text, int(b.m_end[i]), int(b.post_start[cue])):
                effect[i] = b.post_kind[cue]
        return effect

    def _post_reaches(self, text: str, entity_end: int, cue_start: int) -> bool:
        """A post cue reaches back over at most `post_window` words and no copula of another clause part.

        "effusion is smaller and atelectasis has resolved": the "is" shows effusion has its own predicate.
        """
        words = [w.lower() for w in _WORD.findall(text, entity_end, cue_start)]
        if len(words) > self.config.post_window:
            return False
        while words and words[-1] in _AUXILIARIES:
            words.pop()
        return not any(w in _COPULAS for w in words)

    def _polarity(self, b: _Batch, clause: np.ndarray) -> np.ndarray:
        pre = self._pre_effect(b, clause)
        post = self._post_effect(b, clause)
        code = np.where((pre == _KIND_NEG) | (post == _KIND_NEG), _KIND_NEG, np.maximum(pre, post))
        if len(b.prefix_end):  # "non-calcified": the attached word only
            idx = np.searchsorted(b.prefix_end, b.m_start, side="right") - 1
            attached = (idx >= 0) & (b.m_start - b.prefix_end[np.maximum(idx, 0)] <= 1)
            code = np.where(attached, _KIND_NEG, code)
        return code

    # -- descriptors ---------------------------------------------------------------------------------------
    def _descriptors(self, b: _Batch, sentence_start: np.ndarray) -> tuple[np.ndarray, pa.ListArray]:
        """The β words before each entity in its sentence (lower case, surrounding punctuation stripped) and
        the offset where the first of them starts (the entity start when there is none), for all mentions.

        Word indices come from `searchsorted`; the strings are gathered from an Arrow array of the batch's
        words, so nothing loops over mentions in Python (except for non-ASCII batches and glued prefixes).
        A word glued to the entity ("non-" in "non-calcified") counts as the closest descriptor.
        """
        c, beta, m_start = b.chars, self.beta, b.m_start
        n = len(m_start)
        if beta == 0 or n == 0:
            return m_start.copy(), pa.ListArray.from_arrays(
                np.zeros(n + 1, dtype=np.int32), pa.array([], pa.string())
            )
        # the word holding or preceding each entity; a mention is always inside some word, so words exist
        token = np.searchsorted(c.word_starts, m_start, side="right") - 1
        safe = np.maximum(token, 0)
        holds = (token >= 0) & (c.word_ends[safe] > m_start)
        glued = holds & (c.word_starts[safe] < m_start)
        for i in np.flatnonzero(glued).tolist():  # rare: "non-calcified", "(effusion": is the prefix a word?
            glued[i] = any(ch.isalnum() for ch in b.text[c.word_starts[safe[i]] : m_start[i]])
        last_full = np.where(holds, token - 1, token)
        # columns: beta slots, the closest last; a glued prefix takes the last slot
        cols = np.arange(beta)[None, :] - (beta - 1)
        idx = last_full[:, None] + cols + glued[:, None]
        safe_idx = np.clip(idx, 0, len(c.word_starts) - 1)
        span_start, span_end = c.word_starts[safe_idx], c.word_ends[safe_idx]
        valid = (idx >= 0) & (span_start >= sentence_start[:, None]) & (span_end <= m_start[:, None])
        span_start[:, -1] = np.where(glued, c.word_starts[safe], span_start[:, -1])
        span_end[:, -1] = np.where(glued, m_start, span_end[:, -1])
        valid[:, -1] |= glued

        flat_start, flat_end = span_start[valid], span_end[valid]
        if c.ascii_bytes is not None:  # every word of the batch once as Arrow strings, then gathered
            slot = np.where(valid, safe_idx, -1)
            glued_rows = np.flatnonzero(glued)
            slot[glued_rows, -1] = len(c.word_starts) + np.arange(len(glued_rows))
            prefixes = [
                b.text[s:e] for s, e in zip(span_start[glued_rows, -1], span_end[glued_rows, -1], strict=True)
            ]
            vocabulary = pa.concat_arrays(
                [c.strings(b.text, c.word_starts, c.word_ends), pa.array(prefixes, pa.string())]
            )
            tokens = vocabulary.take(pa.array(slot[valid]))
        else:
            tokens = pa.array(
                [b.text[s:e] for s, e in zip(flat_start.tolist(), flat_end.tolist(), strict=True)]
            )
        words = pc.utf8_lower(pc.utf8_trim(tokens, _PUNCTUATION))
        lead = pc.subtract(
            pc.utf8_length(tokens), pc.utf8_length(pc.utf8_ltrim(tokens, _PUNCTUATION))
        ).to_numpy()
        counts = valid.sum(axis=1)
        offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
        first = m_start.copy()
        has = counts > 0
        first[has] = (flat_start + lead)[offsets[:-1][has]]
        return first, pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), words)

    # -- public --------------------------------------------------------------------------------------------
    def match(self, study_ids: Sequence[str], texts: Sequence[str]) -> pa.Table:
        """All mentions in `texts` (one report each), in report order then text order."""
        if len(study_ids) != len(texts):
            raise ValueError(f"{len(study_ids)} study ids but {len(texts)} texts")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(
                f"report {bad} (study {study_ids[bad]!r}): text is {type(texts[bad]).__name__}, not str"
            )
        size = max(1, self.config.batch_size)
        parts = [
            self._match_batch(study_ids[i : i + size], texts[i : i + size])
            for i in range(0, len(texts), size)
        ]
        return pa.concat_tables(parts) if parts else empty_mentions()

    def _match_batch(self, study_ids: Sequence[str], texts: Sequence[str]) -> pa.Table:
        b = self._scan(texts)
        report = np.searchsorted(b.report_starts, b.m_start, side="right") - 1
        sentence = np.searchsorted(b.sentence_starts, b.m_start, side="right") - 1
        first_sentence = np.searchsorted(b.sentence_starts, b.report_starts, side="left")
        clause = np.searchsorted(b.clause_starts, b.m_start, side="right")
        polarity = self._polarity(b, clause)

        offset = b.report_starts[report]
        sent_start = b.sentence_starts[sentence]
        sent_end = np.append(b.sentence_starts, len(b.text) + len(_BATCH_SEPARATOR))[sentence + 1]
        report_end = offset + np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))[report]
        sent_end = np.minimum(sent_end, report_end)

        text = b.text
        descriptor_start, descriptors = self._descriptors(b, sent_start)
        # Sentence strings once per sentence, then gathered per mention by Arrow.
        unique_sentences, which = np.unique(sentence, return_inverse=True)
        first_of = np.searchsorted(sentence, unique_sentences) if len(sentence) else sentence
        sentence_text = pc.utf8_trim_whitespace(
            b.chars.strings(text, sent_start[first_of], sent_end[first_of])
        ).take(pa.array(which.reshape(-1), type=pa.int64()))
        ids = np.asarray(study_ids, dtype=object)
        return pa.Table.from_pydict(
            {
                "study_id": pa.array(ids[report], type=pa.string()),
                "entity": pa.array(
                    np.asarray(self.lexicon.entities, dtype=object)[b.m_entity], type=pa.string()
                ),
                "start": pa.array(b.m_start - offset, type=pa.int64()),
                "end": pa.array(b.m_end - offset, type=pa.int64()),
                "sentence_index": pa.array(sentence - first_sentence[report], type=pa.int64()),
                "sentence": sentence_text,
                "descriptor_start": pa.array(descriptor_start - offset, type=pa.int64()),
                "descriptors": descriptors,
                "polarity": pa.array(np.asarray(POLARITIES, dtype=object)[polarity], type=pa.string()),
            },
            schema=EntityMention.arrow_schema(),
        )


def empty_mentions() -> pa.Table:
    return EntityMention.arrow_schema().empty_table()


# ------------------------------------------------------------------------------------------------------------
# Statistics (Fig. 2) and derived entity lists (Table 8)
# ------------------------------------------------------------------------------------------------------------
def _polarity_counts(mentions: pa.Table, key: str) -> pa.Table:
    """Per `key` value: n_mentions and n_positive / n_negative / n_uncertain, vectorised in Arrow."""
    table = pa.table(
        {
            key: mentions.column(key),
            **{f"n_{p}": pc.cast(pc.equal(mentions.column("polarity"), p), pa.int64()) for p in POLARITIES},
        }
    )
    grouped = table.group_by(key).aggregate([(key, "count"), *[(f"n_{p}", "sum") for p in POLARITIES]])
    return grouped.rename_columns(
        {f"{key}_count": "n_mentions", **{f"n_{p}_sum": f"n_{p}" for p in POLARITIES}}
    )


def entity_stats(mentions: pa.Table, entities: Sequence[str]) -> pa.Table:
    """Mentions per entity by polarity, every listed entity included, most frequent first (Fig. 2 (a))."""
    counts = {r["entity"]: r for r in _polarity_counts(mentions, "entity").to_pylist()}
    unknown = sorted(set(counts) - set(entities))
    if unknown:
        raise ValueError(f"mentions of entities not in the list: {unknown}")
    per_report = mentions.select(["study_id", "entity"]).group_by(["entity", "study_id"]).aggregate([])
    reports = dict(Counter(per_report.column("entity").to_pylist()))
    total = max(mentions.num_rows, 1)
    rows = []
    for entity in entities:
        row = counts.get(entity, {"n_mentions": 0, **{f"n_{p}": 0 for p in POLARITIES}})
        rows.append(
            {
                "entity": entity,
                "n_mentions": row["n_mentions"],
                **{f"n_{p}": row[f"n_{p}"] for p in POLARITIES},
                "n_reports": reports.get(entity, 0),
                "share": row["n_mentions"] / total,
            }
        )
    rows.sort(key=lambda r: (-r["n_mentions"], entities.index(r["entity"])))
    return pa.Table.from_pylist(rows, schema=EntityStat.arrow_schema())


def descriptor_phrases(mentions: pa.Table) -> pa.Array:
    """The descriptor words of each mention joined by spaces ("is no", "there is", "" when none)."""
    return pc.binary_join(mentions.column("descriptors"), " ")


def descriptor_stats(mentions: pa.Table) -> pa.Table:
    """Mentions per descriptor phrase by polarity, most frequent first (Fig. 2 (b)); empty phrases left
    out."""
    table = pa.table({"descriptor": descriptor_phrases(mentions), "polarity": mentions.column("polarity")})
    table = table.filter(pc.not_equal(table.column("descriptor"), ""))
    counts = _polarity_counts(table, "descriptor")
    order = pc.sort_indices(counts, sort_keys=[("n_mentions", "descending"), ("descriptor", "ascending")])
    return counts.take(order).select(DescriptorStat.arrow_schema().names).cast(DescriptorStat.arrow_schema())


def corpus_summary(mentions: pa.Table, n_reports: int, descriptors: pa.Table) -> dict[str, object]:
    """One row of corpus numbers: polarity totals and the top-negative / top-positive descriptor ratio."""
    totals = {p: int(pc.sum(pc.equal(mentions.column("polarity"), p)).as_py() or 0) for p in POLARITIES}
    top = {}
    for polarity in ("negative", "positive"):
        column = descriptors.column(f"n_{polarity}").to_pylist()
        best = max(range(len(column)), key=lambda i: (column[i], -i), default=None)
        top[polarity] = (
            (descriptors.column("descriptor")[best].as_py(), column[best])
            if best is not None and column[best]
            else ("", 0)
        )
    return {
        "n_reports": n_reports,
        "n_reports_with_mention": len(pc.unique(mentions.column("study_id"))),
        "n_mentions": mentions.num_rows,
        **{f"n_{p}": totals[p] for p in POLARITIES},
        "negative_to_positive": totals["negative"] / totals["positive"]
        if totals["positive"]
        else float("nan"),
        "top_negative_descriptor": top["negative"][0],
        "top_positive_descriptor": top["positive"][0],
        "top_descriptor_ratio": top["negative"][1] / top["positive"][1]
        if top["positive"][1]
        else float("nan"),
    }


def derive_entity_list(
    stats: pa.Table, strategy: Literal["top_k", "top_percent"], k: int = 20, percent: float = 10.0
) -> list[str]:
    """Table 8's alternative entity lists from corpus frequencies (an `entity_stats` table): the k most
    mentioned entities, or the most mentioned ceil(percent% of the listed entities). Ties keep the stats
    table's order; entities never mentioned are never selected."""
    if strategy == "top_k":
        if k < 1:
            raise ValueError(f"top_k needs k >= 1, got {k}")
        count = k
    elif strategy == "top_percent":
        if not 0 < percent <= 100:
            raise ValueError(f"top_percent needs 0 < percent <= 100, got {percent}")
        count = math.ceil(stats.num_rows * percent / 100)
    else:
        raise ValueError(f"unknown strategy {strategy!r} (top_k | top_percent)")
    ranked = sorted((r for r in stats.to_pylist() if r["n_mentions"] > 0), key=lambda r: -r["n_mentions"])
    return [r["entity"] for r in ranked[:count]]


def write_entity_list(path: str | Path, entities: Sequence[str], comment: str) -> Path:
    """Write an entity list file that `load_entity_list` reads back (so derived lists are config inputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in comment.splitlines()] + list(entities)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def lexicon_rows(lexicon: EntityLexicon) -> list[dict]:
    """The lexicon as `LexiconForm` rows (every surface form, entities in list order)."""
    rank = {e: i for i, e in enumerate(lexicon.entities)}
    return [
        {"entity": entity, "form": form, "rank": rank[entity], "source": lexicon.source}
        for form, entity in sorted(lexicon.forms.items(), key=lambda fe: (rank[fe[1]], fe[0]))
    ]


def lexicon_from_rows(rows: Sequence[dict]) -> EntityLexicon:
    """Inverse of `lexicon_rows`: the lexicon a later stage reads from the `lexicon` artifact."""
    if not rows:
        raise EntityListError("the lexicon artifact has no rows")
    ordered = sorted(rows, key=lambda r: (r["rank"], r["form"]))
    entities = tuple(dict.fromkeys(r["entity"] for r in ordered))
    return EntityLexicon(entities, {r["form"]: r["entity"] for r in ordered}, source=ordered[0]["source"])
