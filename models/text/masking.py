"""ECAMP's entity-centred, context-enhanced MLM on the text side (paper §3.2, Eq. 2-4).

A batch of (original report, distilled report) pairs becomes `input_ids`, `attention_mask`, `labels` and
per-token loss `weights`:

1. composition: `T = [T_o, T_d]`, the distilled text inserted at a random sentence boundary with probability
   `p_insert_distilled` (official: 0.8), or one of the two alone (ablation rows of Tables 7-8). It is done
   on pieces: boundaries are after '.' pieces (like the official `report.split('.')`, decimals included),
   a '.' is added where a text lacks its final one;
2. tokenization: `[CLS]` + WordPiece pieces (no `[SEP]`, like the official code), truncated and padded to
   `max_len` (always: the loss divides by B·max_len, so the padded length must not depend on the batch);
3. masking, whole-word (a `##` piece is masked iff its word is): the β words before each entity word in the
   same sentence ("descriptors") are always masked, every other word with probability `mask_rate`; masked
   pieces become `[MASK]` (no 80/10/10 split, as in the official code). Words are the pre-tokenizer's
   words; punctuation-only words (',') neither count as nor are descriptors (like "effusion," is one word
   for the paper's whitespace words). Entity surface forms (`models.text.entities` lexicon, multi-piece and
   multi-word ones too) match whole words only. Rules see the whole text; truncation comes last;
4. re-balancing (Eq. 3-4): predicted descriptor pieces in T_neg weigh λ_neg, the other predicted descriptor
   pieces λ_oth, every other predicted piece 1, unpredicted pieces 0 (label -100).

T_neg (`negative_scope`): with `mention` (the default, the paper's intent: "focus on minority-positive disease
descriptions instead of majority-negative words") it is every descriptor of a mention the entity matcher of
stage 2 marks negative: "no" and "pleural" in "no pleural effusion", "the" and "small" in "the small effusion
has resolved". With `cue` (the official code) it is only the words of a negating cue (`models.text.negation`:
"no", "without evidence of", "non"; not inside a pseudo or uncertainty cue such as "no change"), so "pleural"
in "no pleural effusion" weighs λ_oth > 1: the weight taken from negation words moves onto the negated
finding.

Eq. 3 is solved per sample on PIECE counts: N_neg / N_oth = predicted descriptor pieces inside / outside
T_neg, N_a = N_neg + N_oth, λ_oth = (N_a − λ_neg·N_neg) / N_oth, so the descriptor weights of a sample
sum to N_a exactly. A sample with N_oth = 0 has no λ_oth to solve for: its negative descriptors keep λ_neg
(Eq. 4), i.e. all-negative reports — the 20:1 majority — are down-weighted, which is what the factor is for.

Each text (original or distilled) is tokenized (`CachedEncoder`) and analysed once, vectorised over a batch
of texts: vocabulary tables (is `##` piece, is sentence end, is punctuation), phrase matching on packed id
windows at candidate word starts, descriptor windows by β hops to the previous content word with a
sentence-id check. The result (pieces + per-piece facts) is cached per text, since the facts do not depend
on where a text is spliced. Per batch only splicing (CSR scatter) and masking run: Bernoulli draws at word
starts, whole-word expansion by gathering from each piece's word start, λ_oth from per-row sums.

Official-code behaviour (REFERENCE.md §2.3) is available behind `official_quirks`:
- `mlm_on_all_positions`: labels are the original ids at every position, `[CLS]` and `[PAD]` included;
- `official_descriptor_masking`: the forced descriptor masking never runs; entity words (the first word of
  a multi-word form) are masked at `mask_rate`, other words at 0.70 when the text has an entity (at
  `mask_rate` otherwise); `descriptor_masking` is then ignored.
The official weight formula (template tokens anywhere at 0.05, context rescaled so all 256 weights sum to 256)
is not reproduced: we follow Eq. 3-4 of the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from models.resources import DEFAULT_ENTITY_LIST
from models.text.entities import EntityLexicon, EntityMatcher, load_entity_list
from models.text.negation import negating_phrases, non_negating_phrases
from models.text.wordpiece import (
    CLS,
    CONTINUATION_PREFIX,
    MASK,
    PAD,
    SPECIAL_TOKENS,
    CachedEncoder,
    check_special_ids,
    padded_rows,
)

IGNORE_INDEX = -100
OFFICIAL_NON_ENTITY_RATE = 0.70  # official `_context_mask`: non-entity words when the text has an entity


class OfficialQuirks(BaseModel):
    """Switches reproducing the official ECAMP dataset/loss code where it differs from the paper (default:
    off)."""

    model_config = ConfigDict(extra="forbid")
    mlm_on_all_positions: bool = Field(False, description="labels at every position incl. [CLS]/[PAD]")
    official_descriptor_masking: bool = Field(
        False, description="no forced descriptor masking; entity words at mask_rate, others at 0.70"
    )


class TextMaskingConfig(BaseModel):
    """Text composition, masking and re-balancing; defaults are the paper's values."""

    model_config = ConfigDict(extra="forbid")
    mask_rate: float = Field(0.75, ge=0.0, le=1.0, description="masking rate of non-descriptor words")
    beta: int = Field(2, ge=0, description="descriptor words before each entity word")
    lambda_neg: float = Field(0.05, ge=0.0, description="weight of negative descriptor pieces (Eq. 3)")
    negative_scope: Literal["mention", "cue"] = Field(
        "mention",
        description="T_neg of Eq. 3: 'mention' = the descriptors of every mention the entity matcher marks "
        "negative (the paper's intent); 'cue' = only the words of a negation cue (the official code)",
    )
    rebalance: bool = Field(True, description="re-balancing factor on (Table 7 'RF'); off: all weights 1")
    descriptor_masking: bool = Field(True, description="always mask descriptors (Table 7 'DM')")
    max_len: int = Field(256, ge=2, description="tokens incl. [CLS]; every batch is padded to it")
    p_insert_distilled: float = Field(0.8, ge=0.0, le=1.0, description="hybrid: chance to insert T_d")
    text_composition: Literal["origin", "distilled", "hybrid"] = "hybrid"
    negation_cues: list[str] = Field(default_factory=lambda: list(negating_phrases()))
    non_negation_cues: list[str] = Field(
        default_factory=lambda: list(non_negating_phrases()), description="their words are no negation words"
    )
    sentence_end_tokens: list[str] = Field(default_factory=lambda: ["."])
    official_quirks: OfficialQuirks = Field(default_factory=OfficialQuirks)


# ------------------------------------------------------------------------------------------------------------
# Entities and text composition


def read_entity_words(path: str | Path = DEFAULT_ENTITY_LIST) -> list[str]:
    """Every surface form of the entities in a list file (`models.text.entities` lexicon: inflections
    included)."""
    return sorted(load_entity_list(path).forms)


def terminated(text: str, ends: Sequence[str] = (".",)) -> str:
    """`text` ending in a sentence end (adds the first of `ends`), so no descriptor window runs past it."""
    text = text.strip()
    return text if not text or text.endswith(tuple(ends)) else text + ends[0]


def validate_pairs(pairs: Sequence[tuple[str, str | None]], cfg: TextMaskingConfig) -> None:
    """Each item is (original, distilled or None); 'distilled' composition needs every distilled text."""
    for i, pair in enumerate(pairs):
        if not isinstance(pair, tuple | list) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"batch item {i}: expected (original: str, distilled: str | None), got {pair!r}")
    if cfg.text_composition == "distilled":
        missing = [i for i, (_, distilled) in enumerate(pairs) if distilled is None]
        if missing:
            raise ValueError(f"text_composition='distilled' but batch items {missing} have no distilled text")


# ------------------------------------------------------------------------------------------------------------
# Vocabulary tables and phrase matching


def phrase_ids(tokenizer: Tokenizer, phrases: Sequence[str]) -> list[np.ndarray]:
    """Piece-id sequence of each phrase, lower-cased; phrases with an unknown piece cannot match and are left
    out."""
    unk = tokenizer.token_to_id(SPECIAL_TOKENS[1])
    encodings = tokenizer.encode_batch([p.lower() for p in phrases], add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int64) for e in encodings if e.ids and unk not in e.ids]


class PhraseMatcher:
    """Whole-word occurrences of piece-id sequences in a [B, L] id array, by comparing shifted windows.

    Ids are first re-coded to a compact alphabet of the pieces the patterns use (0 = any other piece), then
    each window of k codes is packed into one int64 key and looked up by binary search in the sorted pattern
    keys: one pass per distinct pattern length, not per pattern or per token. Patterns too long to pack (tiny
    vocabularies split words into many pieces) are compared window against pattern.
    """

    def __init__(self, patterns: Sequence[np.ndarray], vocab_size: int):
        used = np.unique(np.concatenate(patterns)) if patterns else np.zeros(0, dtype=np.int64)
        self.code = np.zeros(vocab_size, dtype=np.int64)
        self.code[used] = np.arange(1, used.size + 1)
        self.base = used.size + 1
        self.is_first = np.zeros(vocab_size, dtype=bool)
        self.is_first[[int(p[0]) for p in patterns]] = True
        self.keys: dict[int, np.ndarray] = {}  # packed keys, sorted, per pattern length
        self.long: dict[int, np.ndarray] = {}  # [n, k] codes of patterns too long to pack into an int64
        by_length: dict[int, list[np.ndarray]] = {}
        for p in patterns:
            by_length.setdefault(len(p), []).append(self.code[p])
        for k, group in sorted(by_length.items()):
            if float(self.base) ** k < 2.0**63:
                self.keys[k] = np.unique(np.stack(group) @ self.radix(k))
            else:
                self.long[k] = np.unique(np.stack(group), axis=0)
        self.longest = max(by_length, default=0)

    def radix(self, k: int) -> np.ndarray:
        return self.base ** np.arange(k, dtype=np.int64)

    def find(self, ids: np.ndarray, word_start: np.ndarray, is_continuation: np.ndarray):
        """(starts, covered): matches that start on a word start and end at a word end; every matched piece.

        Only word starts whose piece begins some pattern are candidates (entity and cue words are rare): the
        windows are gathered there, their keys for every length built by one cumulative sum.
        """
        batch, length = ids.shape
        starts = np.zeros((batch, length), dtype=bool)
        covered = np.zeros((batch, length), dtype=bool)
        rows, cols = np.nonzero(word_start & self.is_first[ids])
        if rows.size == 0 or self.longest == 0:
            return starts, covered
        longest = self.longest
        offsets = cols[:, None] + np.arange(longest + 1)
        window = ids[rows[:, None], np.minimum(offsets, length - 1)]
        window[offsets >= length] = 0  # [PAD] after the text: it ends every word
        codes = self.code[window[:, :longest]]
        packable = max(self.keys, default=0)
        prefix_keys = np.cumsum(codes[:, :packable] * self.radix(packable), axis=1)
        ends_word = ~is_continuation[window[:, 1:]]
        match_len = np.zeros(rows.size, dtype=np.int64)
        for k, keys in self.keys.items():
            found = prefix_keys[:, k - 1]
            at = np.minimum(np.searchsorted(keys, found), keys.size - 1)
            match_len = np.where((keys[at] == found) & ends_word[:, k - 1], k, match_len)
        for k, long_codes in self.long.items():
            found = (codes[:, None, :k] == long_codes[None]).all(axis=2).any(axis=1)
            match_len = np.where(found & ends_word[:, k - 1], k, match_len)
        hit = match_len > 0
        starts[rows[hit], cols[hit]] = True
        for j in range(longest):  # patterns never contain code 0, so a match never runs into the padding
            inside = match_len > j
            covered[rows[inside], cols[inside] + j] = True
        return starts, covered


@dataclass(frozen=True)
class VocabTables:
    """Per-vocabulary-id lookups, built once per tokenizer, so masking works on id arrays only."""

    is_continuation: np.ndarray  # '##' piece
    is_frame: np.ndarray  # [PAD] and [CLS]: not text ([UNK] and the others are ordinary pieces of a text)
    is_sentence_end: np.ndarray
    is_punctuation: np.ndarray  # word-initial piece without a letter or digit: not a descriptor word
    entities: PhraseMatcher
    negations: PhraseMatcher
    non_negations: PhraseMatcher  # pseudo and uncertainty cues: they cancel the negation cues inside them

    @classmethod
    def build(cls, tokenizer: Tokenizer, cfg: TextMaskingConfig, entity_words: Sequence[str]) -> VocabTables:
        check_special_ids(tokenizer, source="text masking tokenizer")
        size = tokenizer.get_vocab_size()
        pieces = np.array([tokenizer.id_to_token(i) or "" for i in range(size)], dtype=object)
        is_continuation = np.array([p.startswith(CONTINUATION_PREFIX) for p in pieces], dtype=bool)
        is_frame = np.isin(pieces, [PAD, CLS])
        is_punctuation = np.array([not any(c.isalnum() for c in p) for p in pieces], dtype=bool)
        is_sentence_end = np.isin(pieces, cfg.sentence_end_tokens)
        return cls(
            is_continuation=is_continuation,
            is_frame=is_frame,
            is_sentence_end=is_sentence_end,
            is_punctuation=is_punctuation & ~is_continuation & ~is_frame,
            entities=PhraseMatcher(phrase_ids(tokenizer, entity_words), size),
            negations=PhraseMatcher(phrase_ids(tokenizer, cfg.negation_cues), size),
            non_negations=PhraseMatcher(phrase_ids(tokenizer, cfg.non_negation_cues), size),
        )


# ------------------------------------------------------------------------------------------------------------
# Tokenization, masking, weights


def spread_from_word_start(flag: np.ndarray, word_start_of: np.ndarray, in_word: np.ndarray) -> np.ndarray:
    """Whole-word expansion: each piece takes the flag of its word's first piece."""
    return np.take_along_axis(flag, word_start_of, axis=1) & in_word


def descriptor_starts(
    content: np.ndarray, entity_start: np.ndarray, sentence: np.ndarray, beta: int
) -> np.ndarray:
    """Word starts of the β content words before each entity word, inside the entity's sentence.

    `previous[b, t]` is the start of the last content word before t (one running maximum over the batch);
    from every entity start we follow it β times, stopping at a sentence change. Entity words are sparse, so
    only the hops are per entity, each a vectorised gather.
    """
    batch, length = content.shape
    positions = np.broadcast_to(np.arange(length), content.shape)
    last_content = np.maximum.accumulate(np.where(content, positions, -1), axis=1)
    previous = np.full((batch, length), -1, dtype=np.int64)
    previous[:, 1:] = last_content[:, :-1]
    out = np.zeros_like(content)
    rows, cols = np.nonzero(entity_start)
    home = sentence[rows, cols]
    for _ in range(beta):
        cols = previous[rows, cols]
        keep = cols >= 0
        rows, cols, home = rows[keep], cols[keep], home[keep]
        keep = sentence[rows, cols] == home
        rows, cols, home = rows[keep], cols[keep], home[keep]
        out[rows, cols] = True
    return out


def rebalanced_weights(
    predicted: np.ndarray, descriptor: np.ndarray, negative: np.ndarray, lambda_neg: float
) -> np.ndarray:
    """Eq. 3-4 per sample on predicted pieces; see the module docstring for the counts and the N_oth = 0
    case."""
    neg = predicted & descriptor & negative
    oth = predicted & descriptor & ~negative
    n_neg, n_oth = neg.sum(axis=1), oth.sum(axis=1)
    lambda_oth = np.where(n_oth > 0, (n_neg + n_oth - lambda_neg * n_neg) / np.maximum(n_oth, 1), 1.0)
    weights = predicted.astype(np.float64)
    weights[neg] = lambda_neg
    return np.where(oth, lambda_oth[:, None], weights)


@dataclass(frozen=True)
class MaskedBatch:
    """Everything collate computed, as numpy arrays [B, W] over the W <= max_len columns that hold text;
    `as_tensors` pads to max_len and gives what the model consumes."""

    max_len: int
    token_ids: np.ndarray  # original ids
    input_ids: np.ndarray  # masked pieces replaced by [MASK]
    attention_mask: np.ndarray
    labels: np.ndarray  # original id where predicted, else -100
    weights: np.ndarray  # float64; 0 where not predicted
    masked: np.ndarray
    descriptor: np.ndarray
    negative: np.ndarray  # inside a negation-cue match
    entity: np.ndarray  # inside an entity-word match
    pad_label: int  # label / weight of the padding columns: -100 / 0, or [PAD] / 1 when every position counts
    pad_weight: float

    def as_tensors(self) -> dict[str, torch.Tensor]:
        def padded(a: np.ndarray, value, dtype: torch.dtype) -> torch.Tensor:
            out = torch.full((a.shape[0], self.max_len), value, dtype=dtype)
            out[:, : a.shape[1]] = torch.from_numpy(a)
            return out

        return {
            "input_ids": padded(self.input_ids, 0, torch.long),
            "attention_mask": padded(self.attention_mask, 0, torch.long),
            "labels": padded(self.labels, self.pad_label, torch.long),
            "weights": padded(self.weights.astype(np.float32), self.pad_weight, torch.float32),
        }


# Per-piece facts of a text that do not depend on where it ends up in a sample (bits of one uint8).
WORD_START, DESCRIBED, NEGATIVE, ENTITY_START, ENTITY = 1, 2, 4, 8, 16


class GrowArray:
    """Append-only 1-D array with amortised O(1) appends (capacity doubles): the store grows every batch of
    the first epoch, and re-concatenating it each time would copy the whole cache per batch."""

    def __init__(self, values, dtype):
        self.data = np.array(values, dtype=dtype)
        self.size = self.data.size

    def append(self, values: np.ndarray) -> None:
        need = self.size + values.size
        if need > self.data.size:
            grown = np.empty(max(need, 2 * self.data.size), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : need] = values
        self.size = need

    @property
    def last(self):
        return self.data[self.size - 1]


class SegmentStore:
    """Analysed texts (originals and distilled reports) in CSR arrays: pieces, per-piece facts, boundaries.

    Facts are local to a text: entity and cue matches never contain a sentence end, descriptor windows never
    cross one, and every text is a run of whole sentences, so they stay true wherever the text is spliced.
    Segment 0 is a lone '.' piece, spliced in where an original lacks its final sentence end.
    """

    def __init__(self, end_id: int):
        self.index: dict[str, int] = {}
        self.ids = GrowArray([end_id], np.int32)
        self.flags = GrowArray([WORD_START], np.uint8)
        self.offsets = GrowArray([0, 1], np.int64)  # pieces of segment s: [offsets[s], offsets[s + 1])
        self.bounds = GrowArray([0], np.int64)  # insertion offsets: 0, after each sentence end, length
        self.bound_offsets = GrowArray([0, 1], np.int64)
        self.ends_sentence = GrowArray([True], bool)
        self.has_entity = GrowArray([False], bool)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def lengths(self, seg: np.ndarray) -> np.ndarray:
        return self.offsets.data[seg + 1] - self.offsets.data[seg]

    def add(self, texts: list[str], ids, flags, lengths, bounds, bound_counts, ends_sentence, has_entity):
        self.index.update(zip(texts, range(len(self), len(self) + len(texts)), strict=True))
        self.ids.append(ids)
        self.flags.append(flags)
        self.offsets.append(self.offsets.last + np.cumsum(lengths))
        self.bounds.append(bounds)
        self.bound_offsets.append(self.bound_offsets.last + np.cumsum(bound_counts))
        self.ends_sentence.append(ends_sentence)
        self.has_entity.append(has_entity)

    def cut(self, seg: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Boundary floor(where·(n+1)) of each segment's n+1 boundaries."""
        first, count = (
            self.bound_offsets.data[seg],
            self.bound_offsets.data[seg + 1] - self.bound_offsets.data[seg],
        )
        return self.bounds.data[first + np.minimum((where * count).astype(np.int64), count - 1)]

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pieces and facts of consecutive runs [start, start + length) of the store, concatenated."""
        run = np.repeat(np.arange(starts.size), lengths)
        at = starts[run] + np.arange(run.size) - (np.cumsum(lengths) - lengths)[run]
        return self.ids.data[at].astype(np.int64), self.flags.data[at]


def negation_matcher(entity_words: Sequence[str], beta: int) -> EntityMatcher:
    """The entity matcher of stage 2 over the pre-training's entity words (each form its own entity: only the
    polarity and the descriptor span of a mention matter here)."""
    forms = sorted(set(entity_words))
    return EntityMatcher(EntityLexicon(tuple(forms), {f: f for f in forms}), beta=beta)


def negated_descriptor_pieces(
    matcher: EntityMatcher, tokenizer: Tokenizer, texts: Sequence[str], lengths: np.ndarray, width: int
) -> np.ndarray:
    """[n, width] (column 0 = [CLS]): the pieces inside the descriptor span of a mention the entity matcher
    marks negative ("no pleural effusion": "no", "pleural"), the `negative_scope: mention` T_neg of Eq. 3.

    Character spans become pieces through the tokenizer's offsets, computed only for texts with a negated
    mention; each text is analysed once, so this runs once per report, not per batch."""
    out = np.zeros((len(texts), width), dtype=bool)
    mentions = matcher.match([str(i) for i in range(len(texts))], texts)
    negated = mentions.filter(pc.equal(mentions.column("polarity"), "negative"))
    if not len(negated):
        return out
    rows = np.asarray(negated.column("study_id").to_pylist(), dtype=np.int64)
    first = negated.column("descriptor_start").to_numpy()
    start = negated.column("start").to_numpy()
    which = np.unique(rows)
    encodings = tokenizer.encode_batch([texts[i] for i in which], add_special_tokens=False)
    for row, encoding in zip(which.tolist(), encodings, strict=True):
        if len(encoding.offsets) != lengths[row]:
            raise AssertionError(f"tokenizer offsets disagree with the cached pieces of {texts[row]!r}")
        piece_start = np.array([a for a, _ in encoding.offsets], dtype=np.int64)
        mine = rows == row
        inside = (piece_start[:, None] >= first[mine]) & (piece_start[:, None] < start[mine])
        out[row, 1 : lengths[row] + 1] = inside.any(axis=1)
    return out


class TextCollator:
    """Builds MLM batches; holds the per-vocabulary tables so a DataLoader pays for them once.

    Every text is tokenized and analysed once and kept (`max_segments` texts; a DataLoader worker sees the
    same reports every epoch), so a batch only splices cached pieces and draws the random masking.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        cfg: TextMaskingConfig,
        entity_words: Sequence[str] | None = None,
        max_segments: int = 500_000,
    ):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.tables = VocabTables.build(
            tokenizer, cfg, read_entity_words() if entity_words is None else entity_words
        )
        self.mask_id = tokenizer.token_to_id(MASK)
        self.pad_id = tokenizer.token_to_id(PAD)
        self.cls_id = tokenizer.token_to_id(CLS)
        self.end_id = tokenizer.token_to_id(cfg.sentence_end_tokens[0])
        if self.end_id is None:
            raise ValueError(
                f"sentence end '{cfg.sentence_end_tokens[0]}' is not in the tokenizer's vocabulary"
            )
        self.encoder = CachedEncoder(tokenizer)
        self.matcher = (
            negation_matcher(read_entity_words() if entity_words is None else entity_words, cfg.beta)
            if cfg.negative_scope == "mention"
            else None
        )
        self.max_segments = max_segments
        self.store = SegmentStore(self.end_id)

    def __call__(
        self, pairs: Sequence[tuple[str, str | None]], rng: np.random.Generator
    ) -> dict[str, torch.Tensor]:
        return self.mask(pairs, rng).as_tensors()

    # ---- texts -> segments -------------------------------------------------------------------------------
    def analyse(self, texts: list[str]) -> None:
        """Tokenize and analyse texts in one vectorised pass over a [n, longest + 2] array ([CLS] first)."""
        t, cfg, n = self.tables, self.cfg, len(texts)
        flat, lengths = self.encoder.encode_flat(texts)
        width = int(lengths.max(initial=0)) + 2  # [CLS] + pieces + one [PAD] that ends the last word
        ids = padded_rows(flat, lengths, width, [self.cls_id], self.pad_id)
        word_start = ~t.is_frame[ids] & ~t.is_continuation[ids]
        entity_start, entity = t.entities.find(ids, word_start, t.is_continuation)
        if self.matcher is None:
            negative = (
                t.negations.find(ids, word_start, t.is_continuation)[1]
                & ~t.non_negations.find(ids, word_start, t.is_continuation)[1]
            )
        else:
            negative = negated_descriptor_pieces(self.matcher, self.tokenizer, texts, lengths, width)
        sentence_end = t.is_sentence_end[ids]
        content = word_start & ~t.is_punctuation[ids]
        described = descriptor_starts(content, entity_start, np.cumsum(sentence_end, axis=1), cfg.beta)
        flags = (
            word_start * WORD_START
            + described * DESCRIBED
            + negative * NEGATIVE
            + entity_start * ENTITY_START
            + entity * ENTITY
        ).astype(np.uint8)
        in_text = np.arange(width - 1) < lengths[:, None]
        # Boundaries of text i: 0, each offset after a sentence-end piece below its length, and its length.
        rows, cols = np.nonzero(sentence_end[:, 1:] & (np.arange(1, width) < lengths[:, None]))
        nonempty = np.flatnonzero(lengths > 0)
        bound_rows = np.concatenate([np.arange(n), rows, nonempty])
        bound_vals = np.concatenate([np.zeros(n, dtype=np.int64), cols + 1, lengths[nonempty]])
        order = np.lexsort((bound_vals, bound_rows))
        self.store.add(
            texts,
            ids=flat,
            flags=flags[:, 1:][in_text],
            lengths=lengths,
            bounds=bound_vals[order],
            bound_counts=np.bincount(bound_rows, minlength=n),
            ends_sentence=(lengths == 0) | sentence_end[np.arange(n), lengths],
            has_entity=entity_start.any(axis=1),
        )

    def segment_ids(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self.store.index))
        if missing:
            if len(self.store) + len(missing) > self.max_segments:
                self.store = SegmentStore(self.end_id)
                missing = list(dict.fromkeys(texts))
            self.analyse(missing)
        return np.fromiter(map(self.store.index.__getitem__, texts), dtype=np.int64, count=len(texts))

    def compose(
        self, pairs: Sequence[tuple[str, str | None]], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pieces and facts of each sample's text, concatenated, with per-sample lengths and has-entity.

        Hybrid: with probability p the distilled text goes in at boundary floor(u·(n+1)) of the original's
        n+1 sentence boundaries ('.' pieces, as the official `report.split('.')`), a '.' added first if the
        original's last sentence lacks one. Two uniforms per sample, drawn whatever the texts. Every sample is
        four runs of the store (head, '.', distilled, tail), gathered at once.
        """
        cfg, store = self.cfg, self.store
        validate_pairs(pairs, cfg)
        if not pairs:
            raise ValueError("collate: empty batch")
        distilled = [terminated(d, cfg.sentence_end_tokens) if d else "" for _, d in pairs]
        if cfg.text_composition == "distilled":
            seg = self.segment_ids(distilled)
            store = self.store
            starts, lengths = store.offsets.data[seg][:, None], store.lengths(seg)[:, None]
            has_entity = store.has_entity.data[seg]
        else:
            if cfg.text_composition == "hybrid":
                insert = rng.random(len(pairs)) < cfg.p_insert_distilled
                where = rng.random(len(pairs))
            else:
                insert, where = np.zeros(len(pairs), dtype=bool), np.zeros(len(pairs))
            insert &= np.array([bool(d) for d in distilled])
            originals = [o for o, _ in pairs]
            both = self.segment_ids(originals + distilled if insert.any() else originals)
            store = self.store  # segment_ids may have started a new store
            o = both[: len(pairs)]
            d = both[len(pairs) :] if insert.any() else np.zeros_like(o)  # 0: never gathered (length 0)
            n_o, n_d = store.lengths(o), store.lengths(d)
            cut = np.where(insert, store.cut(o, where), n_o)
            dot = insert & (cut == n_o) & (n_o > 0) & ~store.ends_sentence.data[o]
            start_o = store.offsets.data[o]
            starts = np.stack([start_o, np.zeros_like(o), store.offsets.data[d], start_o + cut], axis=1)
            lengths = np.stack([cut, dot, np.where(insert, n_d, 0), n_o - cut], axis=1)
            has_entity = store.has_entity.data[o] | (insert & store.has_entity.data[d])
        flat_ids, flat_flags = store.gather(starts.ravel(), lengths.ravel().astype(np.int64))
        return flat_ids, flat_flags, lengths.sum(axis=1).astype(np.int64), has_entity

    # ---- masking -----------------------------------------------------------------------------------------
    def mask(self, pairs: Sequence[tuple[str, str | None]], rng: np.random.Generator) -> MaskedBatch:
        cfg, t = self.cfg, self.tables
        flat_ids, flat_flags, lengths, has_entity = self.compose(pairs, rng)
        # Work on the columns that hold text (reports are much shorter than max_len); pad at the end.
        width = int(min(cfg.max_len, lengths.max(initial=0) + 1))
        ids = padded_rows(flat_ids, lengths, width, [self.cls_id], self.pad_id)
        flags = padded_rows(flat_flags, lengths, width, [0], 0)
        draws = rng.random((len(pairs), cfg.max_len))[:, :width]

        word_start = (flags & WORD_START) > 0
        real = ~t.is_frame[ids]
        positions = np.broadcast_to(np.arange(width), ids.shape)
        word_start_of = np.maximum.accumulate(np.where(word_start, positions, 0), axis=1)
        in_word = real & (np.cumsum(word_start, axis=1) > 0)
        described = (flags & DESCRIBED) > 0
        descriptor = spread_from_word_start(described, word_start_of, in_word)
        entity_start = (flags & ENTITY_START) > 0

        official = cfg.official_quirks
        if official.official_descriptor_masking:
            other_rate = np.where(has_entity, OFFICIAL_NON_ENTITY_RATE, cfg.mask_rate)[:, None]
            chosen = word_start & (draws < np.where(entity_start, cfg.mask_rate, other_rate))
        else:
            chosen = word_start & ((draws < cfg.mask_rate) | (described & cfg.descriptor_masking))
        masked = spread_from_word_start(chosen, word_start_of, in_word)

        everywhere = official.mlm_on_all_positions
        predicted = np.ones_like(masked) if everywhere else masked
        negative = (flags & NEGATIVE) > 0
        weights = (
            rebalanced_weights(predicted, descriptor, negative, cfg.lambda_neg)
            if cfg.rebalance
            else predicted.astype(np.float64)
        )
        return MaskedBatch(
            max_len=cfg.max_len,
            token_ids=ids,
            input_ids=np.where(masked, self.mask_id, ids),
            attention_mask=(ids != self.pad_id).astype(np.int64),
            labels=np.where(predicted, ids, IGNORE_INDEX),
            weights=weights,
            masked=masked,
            descriptor=descriptor,
            negative=negative,
            entity=(flags & ENTITY) > 0,
            pad_label=self.pad_id if everywhere else IGNORE_INDEX,
            pad_weight=1.0 if everywhere else 0.0,
        )


def collate(
    batch_texts: Sequence[tuple[str, str | None]],
    tokenizer: Tokenizer,
    cfg: TextMaskingConfig,
    rng: np.random.Generator,
    entity_words: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """One MLM batch: input_ids/attention_mask/labels [B, L] long, weights [B, L] float32 (L = cfg.max_len).

    Convenience form; a training loop should build one `TextCollator` and call it per batch (same output).
    """
    return TextCollator(tokenizer, cfg, entity_words)(batch_texts, rng)


def weighted_mlm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Official normalisation: sum over positions with a label of w · CE, divided by B·L (not by the label
    count).

    logits [B, L, V], labels [B, L] (-100 = no loss), weights [B, L]. Dividing by the fixed B·L keeps the
    weights' meaning (Eq. 3 moves loss mass between descriptors without changing the total scale).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or weights.shape != labels.shape:
        raise ValueError(
            f"weighted_mlm_loss: expected logits [B, L, V] and labels/weights [B, L]; got logits "
            f"{tuple(logits.shape)}, labels {tuple(labels.shape)}, weights {tuple(weights.shape)}"
        )
    batch, length, vocab = logits.shape
    per_token = F.cross_entropy(
        logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch, length)
    return (per_token * weights.to(per_token.dtype)).sum() / (batch * length)
