"""WordPiece tokenizer trained on the report corpus (shared by the GLoRIA and ECAMP text sides).

Mirrors the official ECAMP/MRM vocabulary file `mimic_wordpiece.json`: HF `tokenizers` WordPiece, normalizer
Lowercase + NFKD + StripAccents, pre-tokenizer Whitespace + Digits (digit runs kept together), no
post-processor (callers prepend `[CLS]` themselves). One difference: the official file has no `[SEP]`; we
reserve id 4 for it so both text encoders share one layout `[PAD]=0, [UNK]=1, [CLS]=2, [MASK]=3, [SEP]=4`.

Training is deterministic: the corpus is fed in the order given, in a single thread, and tie-breaking inside
the `tokenizers` trainer is by count then by string.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, CLS, MASK, SEP = "[PAD]", "[UNK]", "[CLS]", "[MASK]", "[SEP]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, MASK, SEP)  # ids 0..4, in this order
CONTINUATION_PREFIX = "##"


def empty_wordpiece() -> Tokenizer:
    """An untrained tokenizer with the official normalisation and pre-tokenisation pipeline."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=False)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tokenizer


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a WordPiece vocabulary of at most `vocab_size` entries on `texts` (paper/official: 30,000).

    The special tokens come first with fixed ids (see `SPECIAL_TOKENS`); `min_frequency` drops merges seen
    fewer times. Raises ValueError when the corpus is empty or the vocabulary cannot even hold the special
    tokens.

    WHY not `WordPieceTrainer` directly: it assigns ids to the `##` alphabet in hash-map order and breaks
    count ties by id, so two runs on the same corpus give different vocabularies
    (huggingface/tokenizers#1794). We run the same merge algorithm (the `tokenizers` BPE trainer, which is
    what `WordPieceTrainer` wraps) on words whose first character and continuation characters are re-coded
    into two private-use Unicode ranges in code-point order; the BPE trainer sorts its alphabet, so every id
    and every tie-break is then reproducible. The merged strings are decoded back to `word` / `##piece`
    tokens.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1")
    tokenizer = empty_wordpiece()
    word_counts = count_words(tokenizer, texts)
    if not word_counts:
        raise ValueError("train_wordpiece: the corpus has no non-empty text")
    code = CharCode.for_words(word_counts)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    chunks = ((code.encode(word) + " ") * count for word, count in sorted(word_counts.items()))
    bpe.train_from_iterator(chunks, trainer=trainer, length=len(word_counts))
    vocab = decoded_vocab(bpe.get_vocab(), code)
    tokenizer.model = models.WordPiece(
        vocab=vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    check_special_ids(tokenizer, source="trained tokenizer")
    return tokenizer


def count_words(tokenizer: Tokenizer, texts: Iterable[str]) -> Counter[str]:
    """Occurrences of each pre-tokenized, normalised word (what the WordPiece trainer would count)."""
    counts: Counter[str] = Counter()
    for text in texts:
        if text and text.strip():
            normalized = tokenizer.normalizer.normalize_str(text)
            counts.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


class CharCode:
    """Order-preserving re-coding of word-initial and continuation characters into disjoint private-use
    ranges."""

    FIRST_BASE, CONT_BASE, RANGE = 0xF0000, 0x100000, 0xFFFE

    def __init__(self, chars: list[str]):
        if len(chars) > self.RANGE:
            raise ValueError(f"train_wordpiece: {len(chars)} distinct characters exceed {self.RANGE}")
        self.first = {c: chr(self.FIRST_BASE + i) for i, c in enumerate(chars)}
        self.cont = {c: chr(self.CONT_BASE + i) for i, c in enumerate(chars)}
        self.plain = dict(enumerate(chars))

    @classmethod
    def for_words(cls, words: Iterable[str]) -> CharCode:
        return cls(sorted(set().union(*map(set, words))))

    def encode(self, word: str) -> str:
        return self.first[word[0]] + "".join(self.cont[c] for c in word[1:])

    def decode(self, token: str) -> str:
        """Private-use token back to `piece` (word-initial) or `##piece` (continuation)."""
        prefix = CONTINUATION_PREFIX if ord(token[0]) >= self.CONT_BASE else ""
        plain = (
            self.plain[ord(c) - (self.CONT_BASE if ord(c) >= self.CONT_BASE else self.FIRST_BASE)]
            for c in token
        )
        return prefix + "".join(plain)


def decoded_vocab(coded_vocab: dict[str, int], code: CharCode) -> dict[str, int]:
    """Decode the BPE vocabulary in id order; a decoded string seen twice keeps its first id, ids stay
    dense."""
    vocab: dict[str, int] = {}
    for token, _ in sorted(coded_vocab.items(), key=lambda item: item[1]):
        text = token if token in SPECIAL_TOKENS else code.decode(token)
        vocab.setdefault(text, len(vocab))
    return vocab


def save_wordpiece(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write the tokenizer as one `tokenizer.json`-style file (readable by `Tokenizer.from_file`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_wordpiece(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `save_wordpiece`, checking the special-token layout the models rely on."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"WordPiece tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path}: not a valid tokenizers JSON file ({err})") from err
    check_special_ids(tokenizer, source=str(path))
    return tokenizer


def check_special_ids(tokenizer: Tokenizer, source: str) -> None:
    """Fail loudly if `[PAD]..[SEP]` are not ids 0..4: the masking code and the models hard-wire them."""
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        if actual != expected_id:
            raise ValueError(f"{source}: special token {token} has id {actual}, expected {expected_id}")


# For ASCII text the official pipeline reduces to: lowercase, then runs of digits / of other word characters /
# of other non-space characters (Whitespace = \w+|[^\w\s]+, then Digits splits digit runs off).
_ASCII_WORDS = re.compile(r"[0-9]+|[A-Za-z_]+|[^\w\s]+", re.ASCII)
_TEXT_BREAK = "\x00"  # joins a batch into one string; a chunk of its own, never in a fast-path text
# Outside the fast path: '[' may start a special token; \x1c-\x1f split `str.split()` but not the tokenizer.
_SLOW_CHARS = re.compile(r"[\[\x00\x1c-\x1f]")


class CachedEncoder:
    """Batch WordPiece encoding into a padded id array, several times faster than `encode_batch` on reports.

    WHY: on short reports most of `encode_batch`'s time is the per-text pipeline, not WordPiece itself. ASCII
    texts (nearly all reports) are joined, lower-cased and cut at whitespace by `str.split`; each distinct
    whitespace-delimited chunk ("effusion.", "2.5cm") is pre-tokenized and split into pieces once, by the
    tokenizer's own model, then looked up. Other texts (non-ASCII, a '[' that could start a special token)
    go through `encode_batch` unchanged. The ids equal `tokenizer.encode(text, add_special_tokens=False).ids`
    either way (tested on real reports).
    """

    def __init__(self, tokenizer: Tokenizer, max_chunks: int = 1_000_000):
        self.tokenizer = tokenizer
        self.max_chunks = max_chunks
        self.reset()

    def reset(self) -> None:
        """Chunk -> index into CSR piece arrays; index 0 is the text break (no pieces)."""
        self.index: dict[str, int] = {_TEXT_BREAK: 0}
        self.offsets = np.zeros(2, dtype=np.int64)  # pieces of chunk c: store[offsets[c] : offsets[c + 1]]
        self.store = np.zeros(0, dtype=np.int64)

    def add_chunks(self, chunks: Iterable[str]) -> None:
        chunks = sorted(chunks)
        if len(self.index) + len(chunks) > self.max_chunks:
            self.reset()
        model = self.tokenizer.model
        pieces = [[t.id for word in _ASCII_WORDS.findall(c) for t in model.tokenize(word)] for c in chunks]
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        self.index.update(zip(chunks, range(len(self.index), len(self.index) + len(chunks)), strict=True))
        self.offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)])
        self.store = np.concatenate([self.store, np.fromiter(chain.from_iterable(pieces), dtype=np.int64)])

    def fast_path(self, texts: Sequence[str]) -> np.ndarray:
        joined = "".join(texts)
        if joined.isascii() and not _SLOW_CHARS.search(joined):
            return np.ones(len(texts), dtype=bool)
        return np.array([t.isascii() and not _SLOW_CHARS.search(t) for t in texts], dtype=bool)

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The pieces of all texts, concatenated (int64), and each text's number of pieces."""
        fast = self.fast_path(texts)
        rows = np.flatnonzero(fast)
        per_text: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(texts)
        lengths = np.zeros(len(texts), dtype=np.int64)
        flat = np.zeros(0, dtype=np.int64)
        if rows.size:
            chunks = f" {_TEXT_BREAK} ".join([texts[i] for i in rows]).lower().split()
            new = set(chunks).difference(self.index)
            if new:
                self.add_chunks(new)
            chunk = np.fromiter(map(self.index.__getitem__, chunks), dtype=np.int64, count=len(chunks))
            start, n_pieces = self.offsets[chunk], self.offsets[chunk + 1] - self.offsets[chunk]
            # CSR gather: piece j of the batch is store[start of its chunk + its rank inside the chunk].
            piece_chunk = np.repeat(np.arange(chunk.size), n_pieces)
            rank = np.arange(piece_chunk.size) - (np.cumsum(n_pieces) - n_pieces)[piece_chunk]
            flat = self.store[start[piece_chunk] + rank]
            lengths[rows] = np.bincount(np.cumsum(chunk == 0), weights=n_pieces, minlength=rows.size)
        slow = np.flatnonzero(~fast)
        if slow.size == 0:
            return flat, lengths
        if rows.size:
            for i, text in zip(rows, np.split(flat, np.cumsum(lengths[rows])[:-1]), strict=True):
                per_text[i] = text
        encodings = self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=False)
        for i, encoding in zip(slow, encodings, strict=True):
            per_text[i] = np.asarray(encoding.ids, dtype=np.int64)
            lengths[i] = len(encoding.ids)
        return np.concatenate(per_text), lengths


def padded_rows(flat: np.ndarray, lengths: np.ndarray, width: int, prefix: Sequence[int], pad_id: int):
    """Scatter concatenated rows (`flat`, split by `lengths`) into [n, width] after `prefix`, truncating."""
    out = np.full((lengths.size, width), pad_id, dtype=flat.dtype)
    out[:, : len(prefix)] = prefix
    row = np.repeat(np.arange(lengths.size), lengths)
    col = np.arange(flat.size) - (np.cumsum(lengths) - lengths)[row] + len(prefix)
    keep = col < width
    out.ravel()[row[keep] * width + col[keep]] = flat[keep]
    return out
